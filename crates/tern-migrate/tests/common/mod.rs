//! Helpers shared by the engine tests: a control block that records its events, a target on a
//! thread, RAM filled with a pattern.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::thread;

use tern_migrate::fake::FakeVm;
use tern_migrate::transport::{Listener, Uri};
use tern_migrate::{
    run_incoming, Capabilities, MigrateError, MigrationControl, MigrationEvent, MigrationParams,
    TargetVm,
};

pub const MIB: u64 = 1 << 20;

pub fn uri(name: &str) -> Uri {
    let p = std::env::temp_dir().join(format!("tern-engine-{}-{name}.sock", std::process::id()));
    Uri::Unix(p)
}

pub fn control(
    params: MigrationParams,
) -> (Arc<MigrationControl>, Arc<Mutex<Vec<MigrationEvent>>>) {
    control_with(
        params,
        Capabilities {
            events: true,
            ram_digest: true,
            ..Default::default()
        },
    )
}

/// [`control`] with these capabilities.
pub fn control_with(
    params: MigrationParams,
    caps: Capabilities,
) -> (Arc<MigrationControl>, Arc<Mutex<Vec<MigrationEvent>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    (
        MigrationControl::new(params, caps, Box::new(move |ev| e.lock().unwrap().push(ev))),
        events,
    )
}

/// Starts a target that accepts one migration into `target` (or refuses with `refuse`).
pub fn target(
    uri: &Uri,
    target: Arc<FakeVm>,
    refuse: Option<&'static str>,
) -> (
    Arc<MigrationControl>,
    thread::JoinHandle<Result<(), String>>,
) {
    target_with(uri, target, refuse, MigrationParams::default())
}

/// [`target`] with the target's own migration parameters (its switch-over fault, say).
pub fn target_with(
    uri: &Uri,
    target: Arc<FakeVm>,
    refuse: Option<&'static str>,
    params: MigrationParams,
) -> (
    Arc<MigrationControl>,
    thread::JoinHandle<Result<(), String>>,
) {
    let listener = Listener::bind(uri, None).unwrap();
    let (ctl, _) = control(params);
    let c = ctl.clone();
    let h = thread::spawn(move || {
        let t = target.clone();
        let factory: tern_migrate::TargetFactory<'_> = Box::new(move |_desc| match refuse {
            Some(why) => Err(MigrateError::Mismatch(why.into())),
            None => Ok(t as Arc<dyn TargetVm>),
        });
        run_incoming(&listener, factory, &c)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    (ctl, h)
}

pub fn fill(vm: &FakeVm, pages: u64) {
    let n = vm.contents().len() as u64;
    for p in 0..pages {
        if p % 3 != 0 {
            vm.guest_write((p % n) as u32, p / n, (p % 251) as u8 + 1);
        }
    }
}
