//! QEMU's user-creatable objects that tern knows: `tls-creds-x509`, from QMP `object-add` or the
//! command line's `--object tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on]`.

use serde_json::{Map, Value};
use tern_migrate::transport::tls::{TlsCreds, TlsEndpoint};

/// Loads the object `args` describes (QMP's shape: `qom-type`, `id`, and its properties).
pub(crate) fn tls_creds(args: &Map<String, Value>) -> Result<TlsCreds, String> {
    let s = |k: &str| -> Result<Option<&str>, String> {
        match args.get(k) {
            None => Ok(None),
            Some(Value::String(v)) => Ok(Some(v.as_str())),
            Some(_) => Err(format!("Parameter '{k}' expects a string")),
        }
    };
    match s("qom-type")? {
        Some("tls-creds-x509") => {}
        Some(t) => {
            return Err(format!(
                "object type '{t}' is not supported by tern (only tls-creds-x509)"
            ))
        }
        None => return Err("Parameter 'qom-type' is missing".into()),
    }
    for k in args.keys() {
        if !["qom-type", "id", "dir", "endpoint", "verify-peer"].contains(&k.as_str()) {
            return Err(format!(
                "Property '{k}' not found (tls-creds-x509 takes id, dir, endpoint, verify-peer)"
            ));
        }
    }
    let id = s("id")?.ok_or("Parameter 'id' is missing")?;
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!("'{id}' is not a valid object id"));
    }
    let dir = s("dir")?.ok_or("tls-creds-x509 needs dir=")?;
    let endpoint = match s("endpoint")?.unwrap_or("client") {
        "server" => TlsEndpoint::Server,
        "client" => TlsEndpoint::Client,
        e => return Err(format!("endpoint={e}: expected server or client")),
    };
    let verify_peer = match args.get("verify-peer") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("Parameter 'verify-peer' expects a boolean".into()),
    };
    TlsCreds::load(id, std::path::Path::new(dir), endpoint, verify_peer)
}

/// `--object TYPE,key=value,...` as QMP's arguments.
pub(crate) fn parse_cli(spec: &str) -> Result<Map<String, Value>, String> {
    let mut parts = spec.split(',');
    let ty = parts.next().unwrap_or_default();
    let mut m = Map::new();
    m.insert("qom-type".into(), Value::String(ty.into()));
    for p in parts {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("'{p}': expected key=value"))?;
        let v = match (k, v) {
            ("verify-peer", "on" | "yes" | "true") => Value::Bool(true),
            ("verify-peer", "off" | "no" | "false") => Value::Bool(false),
            ("verify-peer", other) => {
                return Err(format!("verify-peer={other}: expected on or off"))
            }
            _ => Value::String(v.into()),
        };
        m.insert(k.into(), v);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_objects_say_why() {
        let e = |s: &str| tls_creds(&parse_cli(s).unwrap()).unwrap_err();
        assert!(e("secret,id=s").contains("only tls-creds-x509"));
        assert!(e("tls-creds-x509,dir=/x").contains("'id' is missing"));
        assert!(e("tls-creds-x509,id=t,dir=/nonexistent-tern").contains("is not a directory"));
        assert!(e("tls-creds-x509,id=t,dir=/tmp,endpoint=peer").contains("server or client"));
        assert!(e("tls-creds-x509,id=t,dir=/tmp,colour=red").contains("'colour' not found"));
        assert!(parse_cli("tls-creds-x509,id=t,verify-peer=maybe").is_err());
        assert!(parse_cli("tls-creds-x509,oops").is_err());
    }
}
