//! No module of any crate imports in a circle (issue 14, ../shared/style.md): for each crate
//! root of the workspace (every `lib.rs`, `main.rs` and `src/bin` target), the modules reachable
//! through `mod` declarations form a graph whose edges are the paths a module's code names:
//! `crate::a::b`, `super::x`, `self::x`, and a child module's name (`child::x`, `use child::...`),
//! each resolved to the deepest module the path names (an item of the crate root is the root).
//! Comments, string literals and `#[cfg(test)]` modules are not code that runs and are left
//! out; re-exports (`pub use`) count, so no module can import through the root in a circle.
//! The test fails naming every cycle, and proves on a fixture that it finds one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A crate's modules: path ("crate", "a", "a::b") -> the module's code (comments, strings and
/// test modules removed).
type Modules = BTreeMap<String, String>;

/// The code of `text` without comments and string or char literals (their delimiters stay).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'r' if b.get(i + 1) == Some(&b'#') || b.get(i + 1) == Some(&b'"') => {
                // a raw string r#"..."# (or an identifier starting with r)
                let mut j = i + 1;
                while b.get(j) == Some(&b'#') {
                    j += 1;
                }
                if b.get(j) == Some(&b'"') && (i == 0 || !is_ident(b[i - 1])) {
                    let hashes = j - i - 1;
                    let close: Vec<u8> = std::iter::once(b'"')
                        .chain(std::iter::repeat_n(b'#', hashes))
                        .collect();
                    let end = b[j + 1..]
                        .windows(close.len())
                        .position(|w| w == close.as_slice())
                        .map_or(b.len(), |p| j + 1 + p + close.len());
                    out.push_str("\"\"");
                    i = end;
                } else {
                    out.push('r');
                    i += 1;
                }
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' => {
                // a char literal ('x', '\n', '\u{1F600}') or a lifetime ('a)
                let end = if b.get(i + 1) == Some(&b'\\') {
                    text[i + 2..].find('\'').map(|p| i + 2 + p + 1)
                } else {
                    let c = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                    (b.get(i + 1 + c) == Some(&b'\'')).then_some(i + 2 + c)
                };
                match end {
                    Some(e) => {
                        out.push_str("' '");
                        i = e;
                    }
                    None => {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            _ => {
                let c = text[i..].chars().next().unwrap_or(' ');
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The byte just after the block that starts at the first `{` at or after `from`.
fn block_end(code: &str, from: usize) -> usize {
    let mut depth = 0usize;
    for (i, c) in code[from..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return from + i + 1;
                }
            }
            ';' if depth == 0 => return from + i + 1,
            _ => {}
        }
    }
    code.len()
}

/// `code` without its `#[cfg(test)]` items, and the names of the file modules it declares
/// (`mod name;`, test-only ones excluded).
fn split_module(code: &str) -> (String, Vec<String>) {
    let mut kept = String::new();
    let mut children = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        kept.push_str(&rest[..at]);
        let end = block_end(rest, at);
        rest = &rest[end..];
    }
    kept.push_str(rest);
    let words: Vec<&str> = kept
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ';' || c == '{'))
        .filter(|w| !w.is_empty())
        .collect();
    for w in words.windows(2) {
        if w[0] == "mod" {
            if let Some(name) = w[1].strip_suffix(';') {
                children.push(name.to_string());
            } else if !w[1].contains('{') && kept.contains(&format!("mod {};", w[1])) {
                children.push(w[1].to_string());
            }
        }
    }
    children.sort();
    children.dedup();
    (kept, children)
}

/// The `#[path = "..."]` attributes of `text`'s module declarations: module name -> path.
fn path_attributes(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pending: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("#[path = \"") {
            pending = rest.strip_suffix("\"]").map(str::to_string);
        } else if let Some(p) = pending.take() {
            let decl = line
                .trim_start_matches("pub ")
                .trim_start_matches("pub(crate) ");
            if let Some(name) = decl.strip_prefix("mod ").and_then(|n| n.strip_suffix(';')) {
                out.insert(name.trim().to_string(), p);
            } else if line.starts_with("#[") {
                pending = Some(p);
            }
        }
    }
    out
}

/// Loads the crate whose root file is `root`, following `mod` declarations (and their
/// `#[path]` attributes): a crate root's and a `mod.rs`'s children are beside it, another
/// file's in the directory named after it.
fn load_crate(root: &Path) -> anyhow::Result<Modules> {
    let mut modules = Modules::new();
    let dir = root.parent().unwrap_or(Path::new(".")).to_path_buf();
    // (module path, file, directory its children live in)
    let mut todo = vec![("crate".to_string(), root.to_path_buf(), dir)];
    while let Some((path, file, dir)) = todo.pop() {
        let text = std::fs::read_to_string(&file)?;
        let attributes = path_attributes(&text);
        let (code, children) = split_module(&code_only(&text));
        for c in children {
            let flat = dir.join(format!("{c}.rs"));
            let nested = dir.join(&c).join("mod.rs");
            let (f, d) = if let Some(p) = attributes.get(&c) {
                let f = file.parent().unwrap_or(Path::new(".")).join(p);
                let d = f.with_extension("");
                (f, d)
            } else if flat.exists() {
                (flat, dir.join(&c))
            } else if nested.exists() {
                (nested, dir.join(&c))
            } else {
                anyhow::bail!("{}: mod {c} has no file", file.display());
            };
            let p = if path == "crate" {
                c.clone()
            } else {
                format!("{path}::{c}")
            };
            todo.push((p, f, d));
        }
        modules.insert(path, code);
    }
    Ok(modules)
}

/// The module a path names from module `at`: the deepest module among its leading segments.
fn resolve(modules: &Modules, at: &str, segments: &[&str]) -> Option<String> {
    let mut base: Vec<String> = if at == "crate" {
        Vec::new()
    } else {
        at.split("::").map(str::to_string).collect()
    };
    let mut segs = segments;
    match segs.first() {
        Some(&"crate") => {
            base.clear();
            segs = &segs[1..];
        }
        Some(&"super") => {
            while segs.first() == Some(&"super") {
                base.pop()?;
                segs = &segs[1..];
            }
        }
        Some(&"self") => segs = &segs[1..],
        _ => {}
    }
    let name = |b: &[String]| {
        if b.is_empty() {
            "crate".to_string()
        } else {
            b.join("::")
        }
    };
    let mut found = name(&base);
    for s in segs {
        base.push((*s).to_string());
        if modules.contains_key(&name(&base)) {
            found = name(&base);
        } else {
            break;
        }
    }
    modules.contains_key(&found).then_some(found)
}

/// Every path in `code`: `a::b::c` runs of identifiers (a `use` tree's braces expanded).
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    // use trees first: `use x::{a, b::{c, d}};`
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before_ok = at == 0 || !is_ident(rest.as_bytes()[at - 1]);
        let after = &rest[at + 4..];
        if before_ok && let Some(end) = after.find(';') {
            expand(&after[..end], &mut Vec::new(), &mut out);
            rest = &after[end..];
        } else {
            rest = after;
        }
    }
    // then every other `x::y` run in the code
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if is_ident(bytes[i]) && (i == 0 || (!is_ident(bytes[i - 1]) && bytes[i - 1] != b':')) {
            let mut j = i;
            let mut segs = Vec::new();
            loop {
                let s = j;
                while j < bytes.len() && is_ident(bytes[j]) {
                    j += 1;
                }
                segs.push(code[s..j].to_string());
                if code[j..].starts_with("::") && bytes.get(j + 2).is_some_and(|c| is_ident(*c)) {
                    j += 2;
                } else {
                    break;
                }
            }
            if segs.len() > 1 {
                out.push(segs);
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// Expands one use tree (`a::{b, c::d}`) under `prefix` into full paths.
fn expand(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open]
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let n = prefix.len();
        prefix.extend(head);
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[start..i], prefix, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(&inner[start..], prefix, out);
        prefix.truncate(n);
    } else if !tree.is_empty() {
        let mut p = prefix.clone();
        p.extend(
            tree.split(" as ")
                .next()
                .unwrap_or("")
                .split("::")
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty() && s != "*"),
        );
        out.push(p);
    }
}

/// The module graph: module -> the modules its code names.
fn graph(modules: &Modules) -> BTreeMap<String, BTreeSet<String>> {
    let mut g = BTreeMap::new();
    for (m, code) in modules {
        let mut deps = BTreeSet::new();
        for p in paths(code) {
            let first = p[0].as_str();
            let child = if m == "crate" {
                first.to_string()
            } else {
                format!("{m}::{first}")
            };
            let relative =
                matches!(first, "crate" | "super" | "self") || modules.contains_key(&child);
            if !relative {
                continue;
            }
            let segs: Vec<&str> = if matches!(first, "crate" | "super" | "self") {
                p.iter().map(String::as_str).collect()
            } else {
                std::iter::once("self")
                    .chain(p.iter().map(String::as_str))
                    .collect()
            };
            if let Some(target) = resolve(modules, m, &segs)
                && &target != m
            {
                deps.insert(target);
            }
        }
        g.insert(m.clone(), deps);
    }
    g
}

/// The strongly connected components of more than one module (Tarjan), each sorted.
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> T<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on.insert(v);
            for w in self.g.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low[v];
                    self.low.insert(v, lv.min(lw));
                } else if self.on.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low[v];
                    self.low.insert(v, lv.min(iw));
                }
            }
            if self.low[v] == self.index[v] {
                let mut c = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    c.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if c.len() > 1 {
                    c.sort();
                    self.out.push(c);
                }
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

/// Every crate root of the workspace's packages.
fn crate_roots() -> Vec<PathBuf> {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut roots = Vec::new();
    for pkg in [
        "protocol", "io", "audit", "gateway", "daemon", "client", "tests",
    ] {
        let src = ws.join(pkg).join("src");
        for f in ["lib.rs", "main.rs"] {
            if src.join(f).exists() {
                roots.push(src.join(f));
            }
        }
        if let Ok(bins) = std::fs::read_dir(src.join("bin")) {
            for e in bins.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "rs") {
                    roots.push(p);
                } else if p.join("main.rs").exists() {
                    roots.push(p.join("main.rs"));
                }
            }
        }
    }
    roots.sort();
    roots
}

#[test]
fn no_crate_has_a_module_cycle() -> anyhow::Result<()> {
    let mut found = Vec::new();
    let mut modules_seen = 0;
    let mut edges_seen = 0;
    for root in crate_roots() {
        let modules = load_crate(&root)?;
        let g = graph(&modules);
        modules_seen += modules.len();
        edges_seen += g.values().map(BTreeSet::len).sum::<usize>();
        for c in cycles(&g) {
            found.push(format!("{}: {}", root.display(), c.join(" <-> ")));
        }
    }
    // not vacuous: the workspace's modules and their imports were read
    assert!(
        modules_seen >= 50 && edges_seen >= 50,
        "{modules_seen} modules, {edges_seen} edges"
    );
    assert!(found.is_empty(), "module cycles:\n{}", found.join("\n"));
    Ok(())
}

/// The fixture `tests/fixtures/module-cycle`: a -> b (a `use` tree), b -> c (`super::`), c -> a
/// (`crate::` in an expression) form a cycle; d names a only in a comment, a string and a
/// test module, and a names d: no cycle through d; d::inner uses its parent, which only
/// declares it: no cycle either. The test-only module `tests` (no file) is not followed.
#[test]
fn the_fixture_cycle_is_found() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/module-cycle/lib.rs");
    let modules = load_crate(&root)?;
    assert_eq!(
        modules.keys().map(String::as_str).collect::<Vec<_>>(),
        ["a", "b", "c", "crate", "d", "d::inner"]
    );
    let g = graph(&modules);
    assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]], "{g:#?}");
    assert!(g["a"].contains("d") && !g["d"].contains("a"), "{g:#?}");
    assert!(
        g["d::inner"].contains("d") && !g["d"].contains("d::inner"),
        "{g:#?}"
    );
    Ok(())
}
