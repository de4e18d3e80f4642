//! The compatibility rules of docs/stream-format.md, each with a device that changed over time.

use tern_wire::{
    load_all, save_all, FieldSpec, FieldType, MigratableState, Record, Schema, Section,
    SectionBuilder, SectionDesc, SectionReader, StateError, StreamReader, StreamWriter,
    SubsectionSpec, Value, VmDescription,
};

/// A timer device, version 1: a counter.
const TIMER_V1: Schema = Schema {
    name: "timer",
    version: 1,
    min_version: 1,
    fields: &[FieldSpec {
        name: "count",
        ty: FieldType::U64,
        since: 1,
    }],
    subsections: &[],
};

/// Version 2 adds `period_ns` (its upgrade path: 1 ms, the old fixed period) and an optional
/// `pending-irq` subsection, needed only while an interrupt is pending.
const TIMER_V2: Schema = Schema {
    name: "timer",
    version: 2,
    min_version: 1,
    fields: &[
        FieldSpec {
            name: "count",
            ty: FieldType::U64,
            since: 1,
        },
        FieldSpec {
            name: "period_ns",
            ty: FieldType::U64,
            since: 2,
        },
    ],
    subsections: &[SubsectionSpec {
        name: "pending-irq",
        version: 1,
        fields: &[FieldSpec {
            name: "vector",
            ty: FieldType::U8,
            since: 1,
        }],
    }],
};

#[derive(Debug, Default, PartialEq)]
struct TimerV1 {
    count: u64,
}

impl MigratableState for TimerV1 {
    fn schema(&self) -> &'static Schema {
        &TIMER_V1
    }
    fn instance(&self) -> u32 {
        0
    }
    fn save(&self) -> Result<Section, StateError> {
        SectionBuilder::new(&TIMER_V1, 0)
            .field("count", Value::U64(self.count))?
            .build()
    }
    fn load(&mut self, s: &Section) -> Result<(), StateError> {
        let r = SectionReader::new(&TIMER_V1, s)?;
        self.count = r.u64("count")?;
        Ok(())
    }
}

#[derive(Debug, Default, PartialEq)]
struct TimerV2 {
    count: u64,
    period_ns: u64,
    pending: Option<u8>,
}

impl MigratableState for TimerV2 {
    fn schema(&self) -> &'static Schema {
        &TIMER_V2
    }
    fn instance(&self) -> u32 {
        0
    }
    fn save(&self) -> Result<Section, StateError> {
        SectionBuilder::new(&TIMER_V2, 0)
            .field("count", Value::U64(self.count))?
            .field("period_ns", Value::U64(self.period_ns))?
            .subsection("pending-irq", self.pending.is_some(), |b| {
                b.field("vector", Value::U8(self.pending.unwrap_or(0)))
            })?
            .build()
    }
    fn load(&mut self, s: &Section) -> Result<(), StateError> {
        let r = SectionReader::new(&TIMER_V2, s)?;
        self.count = r.u64("count")?;
        // The explicit upgrade path from version 1.
        self.period_ns = match r.version() {
            1 => 1_000_000,
            _ => r.u64("period_ns")?,
        };
        self.pending = match r
            .subsection("pending-irq")
            .and_then(|s| s.get("vector").cloned())
        {
            Some(Value::U8(v)) => Some(v),
            _ => None,
        };
        Ok(())
    }
}

/// A device that cannot migrate says so.
struct Passthrough;

const PASSTHROUGH: Schema = Schema {
    name: "passthrough",
    version: 1,
    min_version: 1,
    fields: &[],
    subsections: &[],
};

impl MigratableState for Passthrough {
    fn schema(&self) -> &'static Schema {
        &PASSTHROUGH
    }
    fn instance(&self) -> u32 {
        0
    }
    fn save(&self) -> Result<Section, StateError> {
        Err(StateError::NotMigratable {
            device: "passthrough".into(),
            reason: "host device state cannot be read".into(),
        })
    }
    fn load(&mut self, _: &Section) -> Result<(), StateError> {
        Err(StateError::NotMigratable {
            device: "passthrough".into(),
            reason: "host device state cannot be written".into(),
        })
    }
}

/// Sends `devices` through a real stream and returns the sections the target decoded.
fn through_stream(devices: &[&dyn MigratableState]) -> Vec<Section> {
    let sections = save_all(devices).unwrap();
    let desc = VmDescription {
        sections: devices
            .iter()
            .map(|d| d.schema().describe(d.instance()))
            .collect::<Vec<SectionDesc>>(),
        ..Default::default()
    };
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    w.description(&desc).unwrap();
    for s in &sections {
        w.section(s).unwrap();
    }
    let (bytes, _) = w.finish().unwrap();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        if let Record::Section(s) = rec {
            out.push(s);
        }
    }
    out
}

#[test]
fn new_target_loads_an_old_stream_through_the_upgrade_path() {
    let old = TimerV1 { count: 42 };
    let sections = through_stream(&[&old]);
    assert_eq!(sections[0].version, 1);
    let mut new = TimerV2::default();
    load_all(&mut [&mut new], &sections).unwrap();
    assert_eq!(
        new,
        TimerV2 {
            count: 42,
            period_ns: 1_000_000,
            pending: None
        }
    );
}

#[test]
fn old_target_loads_a_new_stream_when_the_subsection_was_not_needed() {
    // The new state travels in a subsection; the section version stays 1 for old targets.
    const TIMER_V1_WITH_SUB: Schema = Schema {
        version: 1,
        fields: TIMER_V1.fields,
        ..TIMER_V2
    };
    struct NewSource(Option<u8>);
    impl MigratableState for NewSource {
        fn schema(&self) -> &'static Schema {
            &TIMER_V1_WITH_SUB
        }
        fn instance(&self) -> u32 {
            0
        }
        fn save(&self) -> Result<Section, StateError> {
            SectionBuilder::new(&TIMER_V1_WITH_SUB, 0)
                .field("count", Value::U64(7))?
                .subsection("pending-irq", self.0.is_some(), |b| {
                    b.field("vector", Value::U8(self.0.unwrap_or(0)))
                })?
                .build()
        }
        fn load(&mut self, _: &Section) -> Result<(), StateError> {
            unreachable!()
        }
    }
    let sections = through_stream(&[&NewSource(None)]);
    let mut old = TimerV1::default();
    load_all(&mut [&mut old], &sections).unwrap();
    assert_eq!(old.count, 7);

    // ...and fails, naming section and subsection, when it was needed.
    let sections = through_stream(&[&NewSource(Some(33))]);
    let err = load_all(&mut [&mut TimerV1::default()], &sections).unwrap_err();
    assert_eq!(
        err,
        StateError::UnknownSubsection {
            section: "timer".into(),
            subsection: "pending-irq".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "section timer: unknown subsection pending-irq"
    );
}

#[test]
fn a_needed_subsection_round_trips_on_a_new_target() {
    let src = TimerV2 {
        count: 1,
        period_ns: 500,
        pending: Some(0x30),
    };
    let sections = through_stream(&[&src]);
    let mut dst = TimerV2::default();
    load_all(&mut [&mut dst], &sections).unwrap();
    assert_eq!(dst, src);
}

#[test]
fn old_target_refuses_a_newer_section_version() {
    let sections = through_stream(&[&TimerV2 {
        count: 1,
        period_ns: 2,
        pending: None,
    }]);
    let err = load_all(&mut [&mut TimerV1::default()], &sections).unwrap_err();
    assert_eq!(
        err,
        StateError::VersionTooNew {
            section: "timer".into(),
            version: 2,
            max: 1
        }
    );
}

#[test]
fn a_device_that_cannot_migrate_fails_the_save_naming_itself() {
    let err = save_all(&[&TimerV1 { count: 1 }, &Passthrough]).unwrap_err();
    assert!(
        err.to_string()
            .contains("device passthrough cannot be migrated"),
        "{err}"
    );
}

#[test]
fn missing_unexpected_and_unknown_fields_fail_cleanly() {
    let s = TimerV1 { count: 3 }.save().unwrap();
    // A section with no device here.
    let err = load_all(&mut [], std::slice::from_ref(&s)).unwrap_err();
    assert_eq!(
        err,
        StateError::UnexpectedSection {
            section: "timer".into(),
            instance: 0
        }
    );
    // A device with no section.
    let err = load_all(&mut [&mut TimerV1::default()], &[]).unwrap_err();
    assert_eq!(
        err,
        StateError::MissingSection {
            section: "timer".into(),
            instance: 0
        }
    );
    // A field the target does not know is not dropped silently.
    let mut extra = s.clone();
    extra.fields.push(("surprise".into(), Value::U32(1)));
    let err = TimerV1::default().load(&extra).unwrap_err();
    assert_eq!(
        err,
        StateError::UnknownField {
            section: "timer".into(),
            field: "surprise".into()
        }
    );
    // A field of the wrong type.
    let mut wrong = s;
    wrong.fields[0].1 = Value::U32(3);
    assert!(matches!(
        TimerV1::default().load(&wrong),
        Err(StateError::WrongType { .. })
    ));
}

#[test]
fn unknown_record_types_mandatory_fail_optional_are_skipped_and_reported() {
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    w.description(&VmDescription::default()).unwrap();
    let at = w.bytes_written();
    w.raw_record(0x7777, tern_wire::FLAG_OPTIONAL, b"from the future")
        .unwrap();
    let (bytes, _) = w.finish().unwrap();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    while r.next_record().unwrap().is_some() {}
    assert_eq!(r.skipped(), &[(at, 0x7777)][..]);

    let mut w = StreamWriter::new(Vec::new()).unwrap();
    w.description(&VmDescription::default()).unwrap();
    let at = w.bytes_written();
    w.raw_record(0x7777, 0, b"from the future").unwrap();
    let (bytes, _) = w.finish().unwrap();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    r.next_record().unwrap();
    let err = r.next_record().unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("at byte {at}: unknown mandatory record type 0x7777")
    );
}
