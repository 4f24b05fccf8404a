//! Helpers for tests of this crate and of the crates above it (feature `test-util`: not part
//! of the API): a deterministic pseudo-random source for the tests that check a fast decoder
//! against its strict one.

/// A deterministic pseudo-random source (xorshift64) for the decoder agreement tests.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    #[expect(
        clippy::should_implement_trait,
        reason = "not an iterator: it never ends"
    )]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// 32 random bytes.
    pub fn digest(&mut self) -> [u8; 32] {
        let mut d = [0u8; 32];
        for b in &mut d {
            *b = self.next() as u8;
        }
        d
    }

    /// A text from a small set (empty, ASCII, accented, an emoji), repeated one to three times.
    pub fn text(&mut self) -> String {
        [
            "",
            "a",
            "ok",
            "résumé",
            "interrupted at seq 4",
            "x/y?z=1",
            "🙂",
        ][self.below(7) as usize]
            .repeat(1 + self.below(3) as usize)
    }

    /// An integer at or next to a CBOR length boundary (0, 23, 24, 255, 256, ...).
    pub fn int(&mut self) -> u64 {
        [
            0,
            1,
            23,
            24,
            255,
            256,
            65535,
            65536,
            u64::from(u32::MAX),
            u64::MAX,
        ][self.below(10) as usize]
            .wrapping_add(self.below(2))
    }
}

/// The records of a vector file of specs/vectors/, in any of its shapes (a file of chains, a
/// file of verifier cases): the hex of every stored entry (`entries[].bytes`) and of every
/// signed checkpoint (`checkpoints[]`), in file order.
pub fn vector_hex(json: &serde_json::Value) -> (Vec<&str>, Vec<&str>) {
    fn walk<'v>(v: &'v serde_json::Value, entries: &mut Vec<&'v str>, cps: &mut Vec<&'v str>) {
        match v {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("entries", serde_json::Value::Array(list)) => {
                            entries.extend(list.iter().filter_map(|e| e.get("bytes")?.as_str()))
                        }
                        ("checkpoints", serde_json::Value::Array(list)) => {
                            cps.extend(list.iter().filter_map(serde_json::Value::as_str));
                        }
                        _ => walk(value, entries, cps),
                    }
                }
            }
            serde_json::Value::Array(list) => list.iter().for_each(|v| walk(v, entries, cps)),
            _ => {}
        }
    }
    let (mut entries, mut cps) = (Vec::new(), Vec::new());
    walk(json, &mut entries, &mut cps);
    (entries, cps)
}

/// The files of specs/vectors/ that hold chains.
pub const VECTOR_FILES: [&str; 4] = [
    "format-switch.json",
    "secret-lifecycle.json",
    "verifier-cases.json",
    "witness.json",
];

/// Every committed input of the fuzz target `target` (fuzz/corpus/TARGET), read from disk.
#[cfg(test)]
pub(crate) fn fuzz_corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("the committed fuzz corpus")
        .map(|f| f.expect("a corpus file").path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read(f).expect("a corpus file"))
        .collect()
}

/// The signed messages of the spec's vectors: their checkpoints, and the `signed` field of
/// every entry.
#[cfg(test)]
pub(crate) fn vector_signed_messages() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/vectors");
    let mut out = Vec::new();
    for file in VECTOR_FILES {
        let text = std::fs::read_to_string(dir.join(file)).expect("vector file");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        let (entries, checkpoints) = vector_hex(&json);
        out.extend(checkpoints.iter().map(|h| hex::decode(h).expect("hex")));
        for entry in entries {
            let bytes = hex::decode(entry).expect("hex");
            let Ok(ciborium::Value::Map(fields)) = crate::cbor::from_slice(&bytes) else {
                continue;
            };
            out.extend(fields.into_iter().filter_map(|(k, v)| match (k, v) {
                (ciborium::Value::Text(k), ciborium::Value::Bytes(b)) if k == "signed" => Some(b),
                _ => None,
            }));
        }
    }
    out
}
