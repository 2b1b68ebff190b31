//! The shape of `src/`: no import cycle between files, and no file over
//! 600 lines. The graph is read from the code itself: every `crate::`,
//! `super::` and `self::` path is followed, through re-exports, to the file
//! that defines what it names.
//!
//! `cargo test --test architecture -- --nocapture` also prints the module
//! map (each file, its lines, and the first line of its docs) and each
//! file's imports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest a file in `src/` may be.
const MAX_LINES: usize = 600;

/// A module path, such as `["subchannel", "pool"]`; empty for the crate.
type ModPath = Vec<String>;

struct Crate {
    /// Every file, by module path.
    files: BTreeMap<ModPath, File>,
}

struct File {
    path: PathBuf,
    text: String,
}

fn read_crate(root: &Path) -> Crate {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/ is readable").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(root).expect("under src/");
            let mut module: ModPath = rel
                .with_extension("")
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect();
            if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                module.pop();
            }
            let text = std::fs::read_to_string(&path).expect("a readable file");
            files.insert(module, File { path, text });
        }
    }
    Crate { files }
}

/// The code of `text` without comments and string literals, so that paths
/// in docs and messages don't count.
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    }
                }
                out.push_str("\"\"");
            }
            // A char literal such as '"' or '{'; lifetimes pass through.
            '\'' => {
                let rest: String = chars.clone().take(3).collect();
                let close = if rest.starts_with('\\') { 3 } else { 1 };
                if rest.chars().nth(close) == Some('\'') {
                    for _ in 0..=close {
                        chars.next();
                    }
                    out.push_str("' '");
                } else {
                    out.push(c);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// `code` without its `#[cfg(test)]` modules: tests are not the
/// architecture.
fn without_tests(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let Some(open) = after.find('{') else {
            rest = "";
            break;
        };
        // Only a module: an item such as a function keeps its place.
        if !after[..open].contains("mod ") {
            out.push_str("#[cfg(test)]");
            rest = &after["#[cfg(test)]".len()..];
            continue;
        }
        let mut depth = 0;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The ranges of `code` inside an inline `mod name { ... }`, where
/// `super::` means the file's own module.
fn inline_modules(code: &str) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let bytes = code.as_bytes();
    let mut search = 0;
    while let Some(at) = code[search..].find("mod ") {
        let at = search + at;
        search = at + 4;
        if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
            continue;
        }
        let tail = &code[at + 4..];
        let name_len = tail
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let after = tail[name_len..].trim_start();
        if !after.starts_with('{') {
            continue;
        }
        let open = code.len() - after.len();
        let mut depth = 0;
        for (i, c) in code[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        ranges.push(open..open + i);
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    ranges
}

/// Expands a use tree such as `crate::a::{b::C, d}` into whole paths.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap_or(&tree).to_owned()];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(expand)
        .map(|p| match p.as_str() {
            "self" => prefix.trim_end_matches("::").to_owned(),
            _ => format!("{prefix}{p}"),
        })
        .collect()
}

/// Every path a file's code names from `crate`, `super` or `self`, once
/// each, written as from the file's own module.
fn paths(code: &str) -> Vec<String> {
    let inline = inline_modules(code);
    let inside = |at: usize| inline.iter().any(|r| r.contains(&at));
    // Inside an inline module, `super::` is the file's module.
    let from_file = |at: usize, path: String| match path.strip_prefix("super::") {
        Some(rest) if inside(at) => format!("self::{rest}"),
        _ => path,
    };
    let mut found = Vec::new();
    // `use` trees, whole.
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        rest = &rest[at + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let end = rest.find(';').unwrap_or(rest.len());
        let tree = &rest[..end];
        let offset = code.len() - rest.len();
        if tree.starts_with("crate::") || tree.starts_with("super::") || tree.starts_with("self::")
        {
            found.extend(expand(tree).into_iter().map(|p| from_file(offset, p)));
        }
    }
    // Paths written inline in the code.
    for start in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(at) = rest.find(start) {
            let before = rest[..at].chars().last();
            let tail = &rest[at..];
            let len = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            // A bare `super::{...}` is a use tree, read above.
            let whole = tail[..len].trim_end_matches(':');
            if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') && whole.contains("::") {
                let offset = code.len() - tail.len();
                found.push(from_file(
                    offset,
                    tail[..len].trim_end_matches(':').to_owned(),
                ));
            }
            rest = &tail[start.len()..];
        }
    }
    let mut seen = BTreeSet::new();
    found.retain(|p| seen.insert(p.clone()));
    found
}

impl Crate {
    /// The file that defines what `path`, written in `from`, names.
    fn resolve(&self, from: &ModPath, path: &str, depth: usize) -> Option<ModPath> {
        if depth > 16 {
            return None;
        }
        self.files.get(from)?;
        let mut segments = path.split("::").filter(|s| !s.is_empty());
        let mut module: ModPath = match segments.next()? {
            "crate" => Vec::new(),
            "super" => {
                let mut m = from.clone();
                m.pop();
                m
            }
            "self" => from.clone(),
            _ => return None,
        };
        let rest: Vec<&str> = segments.collect();
        let mut i = 0;
        while i < rest.len() {
            match rest[i] {
                "super" => {
                    module.pop();
                }
                "self" => {}
                segment => {
                    let mut next = module.clone();
                    next.push(segment.to_owned());
                    if !self.files.contains_key(&next) {
                        break;
                    }
                    module = next;
                }
            }
            i += 1;
        }
        // `module` is a file; `rest[i]`, if any, names an item in it, which
        // may be re-exported from elsewhere.
        let Some(item) = rest.get(i) else {
            return Some(module);
        };
        let here = &self.files[&module];
        for reexport in paths(&code(&here.text)) {
            let last = reexport.rsplit("::").next().unwrap_or("");
            if last == *item && reexport.contains("::") {
                let is_pub = here.text.contains(&format!("pub use {reexport}"))
                    || here.text.contains("pub(crate) use")
                    || here.text.contains("pub use");
                if is_pub
                    && let Some(target) = self.resolve(&module, &reexport, depth + 1)
                    && target != module
                {
                    return Some(target);
                }
            }
        }
        Some(module)
    }

    /// Each file's imports: the other files it names things from.
    fn graph(&self) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
        let mut graph = BTreeMap::new();
        for (module, file) in &self.files {
            let mut deps = BTreeSet::new();
            for path in paths(&without_tests(&code(&file.text))) {
                if let Some(target) = self.resolve(module, &path, 0)
                    && target != *module
                    // A parent declaring its children is not an import.
                    && !(target.starts_with(module) && target.len() == module.len() + 1
                        && path.starts_with("self::"))
                {
                    deps.insert(target);
                }
            }
            graph.insert(module.clone(), deps);
        }
        graph
    }
}

/// The strongly connected components of more than one file: the cycles.
fn cycles(graph: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<ModPath>> {
    // Tarjan's algorithm.
    struct State<'a> {
        graph: &'a BTreeMap<ModPath, BTreeSet<ModPath>>,
        index: BTreeMap<&'a ModPath, usize>,
        low: BTreeMap<&'a ModPath, usize>,
        stack: Vec<&'a ModPath>,
        on_stack: BTreeSet<&'a ModPath>,
        next: usize,
        found: Vec<Vec<ModPath>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a ModPath) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let Some((w, _)) = s.graph.get_key_value(w) else {
                continue;
            };
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.found
}

fn name(root: &Path, file: &File) -> String {
    file.path
        .strip_prefix(root)
        .unwrap_or(&file.path)
        .display()
        .to_string()
}

#[test]
fn no_import_cycle_and_no_file_over_600_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let krate = read_crate(&root);
    let graph = krate.graph();

    println!("| file | lines | role |\n| --- | ---: | --- |");
    for file in krate.files.values() {
        let role = file
            .text
            .lines()
            .find_map(|l| l.strip_prefix("//!"))
            .map(str::trim)
            .unwrap_or("");
        println!(
            "| {} | {} | {role} |",
            name(&root, file),
            file.text.lines().count()
        );
    }
    println!("\nimports:");
    for (module, deps) in &graph {
        let names: Vec<String> = deps.iter().map(|d| name(&root, &krate.files[d])).collect();
        println!(
            "{} -> {}",
            name(&root, &krate.files[module]),
            names.join(", ")
        );
    }

    let long: Vec<String> = krate
        .files
        .values()
        .filter(|f| f.text.lines().count() > MAX_LINES)
        .map(|f| format!("{} ({} lines)", name(&root, f), f.text.lines().count()))
        .collect();
    let found: Vec<Vec<String>> = cycles(&graph)
        .iter()
        .map(|c| c.iter().map(|m| name(&root, &krate.files[m])).collect())
        .collect();
    assert!(found.is_empty(), "import cycles between files: {found:#?}");
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}

#[test]
fn the_reader_sees_through_braces_comments_and_reexports() {
    assert_eq!(
        expand("crate::a::{b::C, d::{E, F}, self}"),
        [
            "crate::a::b::C",
            "crate::a::d::E",
            "crate::a::d::F",
            "crate::a"
        ]
    );
    let text = "// use crate::x::Y;\nlet s = \"crate::z::W\";\nuse super::p::Q;";
    assert_eq!(paths(&code(text)), ["super::p::Q"]);
    let text = "use crate::a::B;\nmod bench { use super::C; }\n#[cfg(test)]\nmod tests { use crate::d::E; }";
    assert_eq!(
        paths(&without_tests(&code(text))),
        ["crate::a::B", "self::C"]
    );
}
