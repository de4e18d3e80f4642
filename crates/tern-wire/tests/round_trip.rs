//! Round trips of random content through the encoder and the decoder (proptest): any section
//! comes back field for field, and any sequence of page records leaves the pages the last write
//! of each says. The damage side is in `robustness.rs`.

mod common;

use common::desc;
use proptest::prelude::*;
use tern_wire::{
    RamRun, Record, RunData, Section, StreamReader, StreamWriter, Subsection, Value, ENC_RAW,
    PAGE_SIZE,
};

fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<u8>().prop_map(Value::U8),
        any::<u16>().prop_map(Value::U16),
        any::<u32>().prop_map(Value::U32),
        any::<u64>().prop_map(Value::U64),
        any::<i64>().prop_map(Value::I64),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Value::Bytes),
        "[a-z0-9 ]{0,20}".prop_map(Value::Str),
        proptest::collection::vec(any::<u64>(), 0..8).prop_map(Value::U64s),
    ]
}

fn arb_fields() -> impl Strategy<Value = Vec<(String, Value)>> {
    proptest::collection::vec(("[a-z_]{1,12}", arb_value()), 0..10)
}

fn arb_section() -> impl Strategy<Value = Section> {
    (
        "[a-z]{1,16}",
        any::<u32>(),
        any::<u32>(),
        arb_fields(),
        proptest::collection::vec(("[a-z-]{1,10}", any::<u32>(), arb_fields()), 0..3),
    )
        .prop_map(|(name, instance, version, fields, subs)| Section {
            name,
            instance,
            version,
            fields,
            subsections: subs
                .into_iter()
                .map(|(name, version, fields)| Subsection {
                    name,
                    version,
                    fields,
                    subsections: vec![],
                })
                .collect(),
        })
}

/// A page set: (first page, Some(fill byte) for raw pages or None for zero, count).
fn arb_runs() -> impl Strategy<Value = Vec<(u64, Option<u8>, u32)>> {
    proptest::collection::vec((0u64..60, proptest::option::of(1u8..=255), 1u32..4), 1..12)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn sections_round_trip(s in arb_section()) {
        let body = s.encode().unwrap();
        prop_assert_eq!(Section::decode(&body).unwrap(), s);
    }

    #[test]
    fn page_sets_round_trip(records in proptest::collection::vec(arb_runs(), 1..6)) {
        // Model: 64 pages of region 0; the last write of a page wins.
        let mut model = vec![0u8; 64];
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.description(&desc(0)).unwrap();
        let mut data_keep = Vec::new();
        for runs in &records {
            let mut bufs = Vec::new();
            for (first, fill, count) in runs {
                if let Some(f) = fill {
                    bufs.push(vec![*f; *count as usize * PAGE_SIZE]);
                }
                let _ = first;
            }
            data_keep.push(bufs);
        }
        for (runs, bufs) in records.iter().zip(&data_keep) {
            let mut b = bufs.iter();
            let wire: Vec<RamRun> = runs.iter().map(|(first, fill, count)| RamRun {
                first_page: *first,
                data: match fill { Some(_) => RunData::Raw(b.next().unwrap()), None => RunData::Zero(*count) },
            }).collect();
            w.ram_pages(0, &wire).unwrap();
            for (first, fill, count) in runs {
                for p in *first..*first + u64::from(*count) {
                    model[p as usize] = fill.unwrap_or(0);
                }
            }
        }
        let (bytes, _) = w.finish().unwrap();
        let mut got = vec![0u8; 64];
        let mut r = StreamReader::new(&bytes[..]).unwrap();
        while let Some(rec) = r.next_record().unwrap() {
            if let Record::Ram(ram) = rec {
                for run in &ram.runs {
                    for k in 0..u64::from(run.count) {
                        let p = (run.first_page + k) as usize;
                        got[p] = if run.encoding == ENC_RAW {
                            let d = ram.data(run);
                            let page = &d[k as usize * PAGE_SIZE..(k as usize + 1) * PAGE_SIZE];
                            prop_assert!(page.iter().all(|&x| x == page[0]));
                            page[0]
                        } else { 0 };
                    }
                }
            }
        }
        prop_assert_eq!(got, model);
    }
}
