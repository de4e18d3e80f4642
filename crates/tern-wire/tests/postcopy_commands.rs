//! POSTCOPY_COMMAND bodies from an untrusted source: bounded before anything is allocated.

use tern_wire::PostcopyCommand;

/// Postcopy commands are bounded before anything is allocated: a DISCARD may name at most
/// 65 536 ranges, and its count must match its length.
#[test]
fn postcopy_commands_are_bounded() {
    let ok = PostcopyCommand::Discard {
        region: 2,
        ranges: vec![(0, 1); tern_wire::MAX_DISCARD_RANGES],
    };
    assert_eq!(PostcopyCommand::decode(&ok.encode()).unwrap(), ok);
    let mut over = PostcopyCommand::Discard {
        region: 2,
        ranges: vec![(0, 1); tern_wire::MAX_DISCARD_RANGES + 1],
    }
    .encode();
    assert!(PostcopyCommand::decode(&over).is_err());
    // A count that does not match the body.
    over[8..12].copy_from_slice(&3u32.to_le_bytes());
    assert!(PostcopyCommand::decode(&over).is_err());
    for c in [
        PostcopyCommand::Listen,
        PostcopyCommand::Run,
        PostcopyCommand::Resume,
    ] {
        assert_eq!(PostcopyCommand::decode(&c.encode()).unwrap(), c);
        let mut long = c.encode();
        long.push(0);
        assert!(PostcopyCommand::decode(&long).is_err());
    }
}
