//! POSTCOPY_COMMAND records (`docs/stream-format.md`, *Postcopy*).

use crate::error::ErrorKind;

/// Most ranges one DISCARD may carry.
pub const MAX_DISCARD_RANGES: usize = 65_536;

/// Postcopy commands (`docs/stream-format.md`, *Postcopy*).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostcopyCommand {
    Advise {
        page_size: u64,
        total_pages: u64,
    },
    Discard {
        region: u32,
        ranges: Vec<(u64, u64)>,
    },
    Listen,
    Run,
    /// Recovery: the first record after VM_DESCRIPTION on a new connection to a paused target.
    Resume,
}

impl PostcopyCommand {
    /// Encodes the record body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let (cmd, data): (u16, Vec<u8>) = match self {
            PostcopyCommand::Advise {
                page_size,
                total_pages,
            } => {
                let mut d = page_size.to_le_bytes().to_vec();
                d.extend_from_slice(&total_pages.to_le_bytes());
                (1, d)
            }
            PostcopyCommand::Discard { region, ranges } => {
                let mut d = region.to_le_bytes().to_vec();
                d.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
                for (first, count) in ranges {
                    d.extend_from_slice(&first.to_le_bytes());
                    d.extend_from_slice(&count.to_le_bytes());
                }
                (2, d)
            }
            PostcopyCommand::Listen => (3, vec![]),
            PostcopyCommand::Run => (4, vec![]),
            PostcopyCommand::Resume => (5, vec![]),
        };
        b.extend_from_slice(&cmd.to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&data);
        b
    }

    /// Decodes a record body.
    pub fn decode(body: &[u8]) -> Result<Self, ErrorKind> {
        let bad = |reason: &str| ErrorKind::Malformed {
            record: "POSTCOPY_COMMAND",
            reason: reason.into(),
        };
        if body.len() < 4 {
            return Err(bad("body shorter than 4 bytes"));
        }
        if body[2..4] != [0, 0] {
            return Err(ErrorKind::NonZeroReserved(
                "postcopy command reserved field",
            ));
        }
        let d = &body[4..];
        let u64_at = |at: usize| u64::from_le_bytes(d[at..at + 8].try_into().expect("8"));
        match u16::from_le_bytes([body[0], body[1]]) {
            1 if d.len() == 16 => Ok(PostcopyCommand::Advise {
                page_size: u64_at(0),
                total_pages: u64_at(8),
            }),
            2 if d.len() >= 8 => {
                let region = u32::from_le_bytes(d[0..4].try_into().expect("4"));
                let n = u32::from_le_bytes(d[4..8].try_into().expect("4")) as usize;
                if n > MAX_DISCARD_RANGES {
                    return Err(bad("more than 65536 ranges in one DISCARD"));
                }
                if (d.len() - 8) != n.checked_mul(16).ok_or_else(|| bad("count overflows"))? {
                    return Err(bad("DISCARD count does not match its length"));
                }
                let ranges = (0..n)
                    .map(|i| (u64_at(8 + i * 16), u64_at(16 + i * 16)))
                    .collect();
                Ok(PostcopyCommand::Discard { region, ranges })
            }
            3 if d.is_empty() => Ok(PostcopyCommand::Listen),
            4 if d.is_empty() => Ok(PostcopyCommand::Run),
            5 if d.is_empty() => Ok(PostcopyCommand::Resume),
            1..=5 => Err(bad("wrong length for the command")),
            other => Err(bad(&format!("unknown command {other}"))),
        }
    }
}
