//! The records around the stream: the channel hello that opens a live connection, the return
//! path's messages (target to source) and GO, the source's commit after END
//! (`docs/stream-format.md`, *The switch-over*).

use crate::error::ErrorKind;

/// Longest RETURN_MESSAGE body a source accepts.
pub const MAX_RETURN_MESSAGE: usize = 64 << 10;

/// Messages on the return path (target to source).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReturnMessage {
    PageRequest {
        region: u32,
        first_page: u64,
        count: u64,
    },
    Ack {
        sequence: u64,
    },
    Error {
        code: u32,
        message: String,
    },
    /// END was read and everything loaded; the guest does not run yet.
    Loaded {
        records: u64,
    },
    /// GO was received and the vCPUs run.
    Running,
    /// Postcopy: END was read and checked, and the target holds every page.
    Complete {
        records: u64,
    },
    /// Postcopy: the target pauses (migrate-pause, or its source fell silent); it keeps the
    /// guest and waits for a recovery. A live target never closes after RUN without it.
    Paused,
    /// Recovery: the pages the target holds, one bit per page from `first_page` (bit i of word
    /// j is page first_page + 64 j + i), at most [`MAX_RECEIVED_WORDS`] words.
    Received {
        region: u32,
        first_page: u64,
        words: Vec<u64>,
    },
    /// Recovery: every RECEIVED was sent; the target waits for the pages it lacks.
    ResumeAck,
}

/// Most bitmap words one RECEIVED carries (32 KiB: 262 144 pages, 1 GiB of guest RAM).
pub const MAX_RECEIVED_WORDS: usize = 4096;

impl ReturnMessage {
    /// Encodes the record body (record type RETURN_MESSAGE). An ERROR's text is cut to fit
    /// [`MAX_RETURN_MESSAGE`] (at a character boundary).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            ReturnMessage::PageRequest {
                region,
                first_page,
                count,
            } => {
                b.extend_from_slice(&[1, 0, 0, 0]);
                b.extend_from_slice(&region.to_le_bytes());
                b.extend_from_slice(&[0; 4]);
                b.extend_from_slice(&first_page.to_le_bytes());
                b.extend_from_slice(&count.to_le_bytes());
            }
            ReturnMessage::Ack { sequence } => {
                b.extend_from_slice(&[2, 0, 0, 0]);
                b.extend_from_slice(&sequence.to_le_bytes());
            }
            ReturnMessage::Error { code, message } => {
                b.extend_from_slice(&[3, 0, 0, 0]);
                b.extend_from_slice(&code.to_le_bytes());
                let mut end = message.len().min(MAX_RETURN_MESSAGE - 8);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                b.extend_from_slice(&message.as_bytes()[..end]);
            }
            ReturnMessage::Loaded { records } => {
                b.extend_from_slice(&[4, 0, 0, 0]);
                b.extend_from_slice(&records.to_le_bytes());
            }
            ReturnMessage::Running => b.extend_from_slice(&[5, 0, 0, 0]),
            ReturnMessage::Complete { records } => {
                b.extend_from_slice(&[6, 0, 0, 0]);
                b.extend_from_slice(&records.to_le_bytes());
            }
            ReturnMessage::Paused => b.extend_from_slice(&[7, 0, 0, 0]),
            ReturnMessage::Received {
                region,
                first_page,
                words,
            } => {
                b.extend_from_slice(&[8, 0, 0, 0]);
                b.extend_from_slice(&region.to_le_bytes());
                b.extend_from_slice(&(words.len() as u32).to_le_bytes());
                b.extend_from_slice(&first_page.to_le_bytes());
                for w in words {
                    b.extend_from_slice(&w.to_le_bytes());
                }
            }
            ReturnMessage::ResumeAck => b.extend_from_slice(&[9, 0, 0, 0]),
        }
        b
    }

    /// Decodes a record body.
    pub fn decode(body: &[u8]) -> Result<Self, ErrorKind> {
        let bad = |reason: &str| ErrorKind::Malformed {
            record: "RETURN_MESSAGE",
            reason: reason.into(),
        };
        if body.len() > MAX_RETURN_MESSAGE {
            return Err(ErrorKind::TooLarge {
                what: "return message",
                len: body.len() as u64,
                max: MAX_RETURN_MESSAGE as u64,
            });
        }
        if body.len() < 4 || body[2..4] != [0, 0] {
            return Err(bad("bad header"));
        }
        let d = &body[4..];
        let u64_at = |at: usize| u64::from_le_bytes(d[at..at + 8].try_into().expect("8"));
        match u16::from_le_bytes([body[0], body[1]]) {
            1 if d.len() == 24 && d[4..8] == [0; 4] => Ok(ReturnMessage::PageRequest {
                region: u32::from_le_bytes(d[0..4].try_into().expect("4")),
                first_page: u64_at(8),
                count: u64_at(16),
            }),
            2 if d.len() == 8 => Ok(ReturnMessage::Ack {
                sequence: u64_at(0),
            }),
            3 if d.len() >= 4 => Ok(ReturnMessage::Error {
                code: u32::from_le_bytes(d[0..4].try_into().expect("4")),
                message: String::from_utf8_lossy(&d[4..]).into_owned(),
            }),
            4 if d.len() == 8 => Ok(ReturnMessage::Loaded { records: u64_at(0) }),
            5 if d.is_empty() => Ok(ReturnMessage::Running),
            6 if d.len() == 8 => Ok(ReturnMessage::Complete { records: u64_at(0) }),
            7 if d.is_empty() => Ok(ReturnMessage::Paused),
            8 if d.len() >= 16 => {
                let n = u32::from_le_bytes(d[4..8].try_into().expect("4")) as usize;
                if n > MAX_RECEIVED_WORDS || d.len() != 16 + n * 8 {
                    return Err(bad("RECEIVED's word count does not match its length"));
                }
                Ok(ReturnMessage::Received {
                    region: u32::from_le_bytes(d[0..4].try_into().expect("4")),
                    first_page: u64_at(8),
                    words: (0..n).map(|i| u64_at(16 + i * 8)).collect(),
                })
            }
            9 if d.is_empty() => Ok(ReturnMessage::ResumeAck),
            _ => Err(bad("unknown kind or wrong length")),
        }
    }
}

/// What a connection of a live migration carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelRole {
    /// The stream itself.
    Main,
    /// RAM pages of parallel channels.
    Data,
    /// Pages a postcopy target asked for.
    PostcopyUrgent,
}

/// The first record of every connection of a live migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelHello {
    /// The same on every connection of one migration.
    pub session: [u8; 16],
    pub role: ChannelRole,
    /// 0 for main; the data channel's number otherwise.
    pub index: u16,
    /// Connections of the migration in all, main included.
    pub channels: u16,
}

impl ChannelHello {
    /// Encodes the record body (record type CHANNEL_HELLO).
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..16].copy_from_slice(&self.session);
        let role: u16 = match self.role {
            ChannelRole::Main => 0,
            ChannelRole::Data => 1,
            ChannelRole::PostcopyUrgent => 2,
        };
        b[16..18].copy_from_slice(&role.to_le_bytes());
        b[18..20].copy_from_slice(&self.index.to_le_bytes());
        b[20..22].copy_from_slice(&self.channels.to_le_bytes());
        b
    }

    /// Decodes a record body.
    pub fn decode(body: &[u8]) -> Result<Self, ErrorKind> {
        let bad = |reason: String| ErrorKind::Malformed {
            record: "CHANNEL_HELLO",
            reason,
        };
        let b: &[u8; 24] = body
            .try_into()
            .map_err(|_| bad(format!("body is {} bytes, not 24", body.len())))?;
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let role = match u16_at(16) {
            0 => ChannelRole::Main,
            1 => ChannelRole::Data,
            2 => ChannelRole::PostcopyUrgent,
            r => return Err(bad(format!("unknown role {r}"))),
        };
        if u16_at(22) != 0 {
            return Err(ErrorKind::NonZeroReserved("channel hello reserved field"));
        }
        let (index, channels) = (u16_at(18), u16_at(20));
        if channels == 0 || index >= channels {
            return Err(bad(format!("index {index} of {channels} channels")));
        }
        let mut session = [0u8; 16];
        session.copy_from_slice(&b[..16]);
        Ok(ChannelHello {
            session,
            role,
            index,
            channels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_messages_round_trip() {
        for m in [
            ReturnMessage::PageRequest {
                region: 3,
                first_page: 7,
                count: 9,
            },
            ReturnMessage::Ack { sequence: 42 },
            ReturnMessage::Error {
                code: 1,
                message: "nope".into(),
            },
            ReturnMessage::Loaded { records: 1234 },
            ReturnMessage::Running,
            ReturnMessage::Complete { records: 77 },
            ReturnMessage::Paused,
            ReturnMessage::Received {
                region: 1,
                first_page: 4096,
                words: vec![u64::MAX, 0, 5],
            },
            ReturnMessage::Received {
                region: 0,
                first_page: 0,
                words: vec![7; MAX_RECEIVED_WORDS],
            },
            ReturnMessage::ResumeAck,
        ] {
            assert_eq!(ReturnMessage::decode(&m.encode()).unwrap(), m);
        }
        for bad in [
            &[][..],
            &[5, 0, 0, 0, 1][..],
            &[4, 0, 0, 0][..],
            &[6, 0, 0, 0, 1, 2][..],
            &[10, 0, 0, 0][..],
            &[9, 0, 0, 0, 0][..],
            &[7, 0, 0, 0, 1][..],
            // RECEIVED: two words announced, one there.
            &[
                8, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0,
            ][..],
        ] {
            assert!(ReturnMessage::decode(bad).is_err(), "{bad:?}");
        }
        assert!(ReturnMessage::decode(&vec![3; MAX_RETURN_MESSAGE + 1]).is_err());
        let over = ReturnMessage::Received {
            region: 0,
            first_page: 0,
            words: vec![0; MAX_RECEIVED_WORDS + 1],
        };
        assert!(ReturnMessage::decode(&over.encode()).is_err());
        let long = ReturnMessage::Error {
            code: 1,
            message: "é".repeat(MAX_RETURN_MESSAGE),
        };
        let enc = long.encode();
        assert!(enc.len() <= MAX_RETURN_MESSAGE);
        assert!(ReturnMessage::decode(&enc).is_ok());
    }

    #[test]
    fn hello_round_trip_and_errors() {
        let h = ChannelHello {
            session: [7; 16],
            role: ChannelRole::Data,
            index: 2,
            channels: 5,
        };
        assert_eq!(ChannelHello::decode(&h.encode()).unwrap(), h);
        let mut b = h.encode();
        b[16] = 9;
        assert!(ChannelHello::decode(&b).is_err());
        let mut b = h.encode();
        b[18] = 5;
        assert!(ChannelHello::decode(&b).is_err(), "index >= channels");
        let mut b = h.encode();
        b[23] = 1;
        assert!(ChannelHello::decode(&b).is_err());
        assert!(ChannelHello::decode(&b[..20]).is_err());
    }
}
