//! `tern analyze` and `tern verify`: read a migration stream from a file or standard input.

use std::io::{BufReader, Read};
use std::process::ExitCode;

use anyhow::{Context, Result};
use tern_wire::inspect::{analyze as read_stream, Analysis, AnalyzeError};

fn open(input: &str) -> Result<Box<dyn Read>> {
    Ok(if input == "-" {
        Box::new(BufReader::with_capacity(1 << 20, std::io::stdin().lock()))
    } else {
        let f = std::fs::File::open(input).with_context(|| format!("cannot open {input}"))?;
        Box::new(BufReader::with_capacity(1 << 20, f))
    })
}

fn read(input: &str) -> Result<std::result::Result<Analysis, Box<AnalyzeError>>> {
    Ok(read_stream(open(input)?))
}

/// Prints a summary (or `--json` dump); exit 1 if the stream is invalid.
pub fn analyze(input: &str, json: bool) -> Result<ExitCode> {
    let (analysis, error) = match read(input)? {
        Ok(a) => (a, None),
        Err(e) => (e.partial, Some(e.error)),
    };
    if json {
        let mut j = analysis.to_json();
        j["error"] = error.as_ref().map(|e| e.to_string()).into();
        say!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        print!("{}", analysis.to_text());
    }
    match error {
        None => Ok(ExitCode::SUCCESS),
        Some(e) => {
            eprintln!("tern: {input}: invalid stream: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Exit 0 if every check passes; otherwise 1 with the first error and its byte offset.
pub fn verify(input: &str) -> Result<ExitCode> {
    match read(input)? {
        Ok(a) => {
            let t = a.totals.unwrap_or_default();
            if a.mapped.is_some() {
                // The pages follow the records: each is read and checked against its CRC.
                let f = std::fs::File::open(input).with_context(|| {
                    format!("a mapped-layout file is verified from a file, not {input}")
                })?;
                let checked = tern_wire::MappedFile::open(f).and_then(|m| m.verify_pages());
                if let Err(e) = checked {
                    eprintln!("tern: {input}: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            }
            say!(
                "{input}: ok: {} bytes{}, {} records, {} pages with data, {} zero pages, {} sections",
                a.bytes,
                if a.mapped.is_some() {
                    " of records (mapped layout: every page checked against its CRC)"
                } else {
                    ""
                },
                t.records + 1,
                t.raw_pages,
                t.zero_pages,
                a.sections.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("tern: {input}: {}", e.error);
            Ok(ExitCode::FAILURE)
        }
    }
}
