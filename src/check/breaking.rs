//! `protomesh check --breaking`: the contracts as they are against another
//! version of them (a directory, a file, a descriptor set, or a git ref),
//! listing every breaking change by buf's rules and every policy a method's
//! contract tightens, for a CI step or a review.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::json;

use crate::contract::breaking::{Category, Finding, Rule, compare};
use crate::contract::tightening::{Tightened, tightened};
use crate::contract::{ContractMode, Contracts, ContractsConfig};

/// The exit code when breaking changes are found, as buf's.
pub const BREAKING_EXIT_CODE: u8 = 100;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `file:line:column: message (RULE)`, one per line.
    #[default]
    Text,
    /// One JSON object per line: path, start_line, start_column, type (the rule), message, severity.
    Json,
    /// GitHub Actions workflow commands, which annotate the pull request's lines.
    GithubActions,
}

/// What to compare, and how to tell it.
pub struct Request {
    /// `.proto` files, directories of them, or descriptor sets; none: the config's `contracts`.
    pub inputs: Vec<PathBuf>,
    /// Where imports that are not in the inputs are found, as protoc's `-I`.
    pub include: Vec<PathBuf>,
    /// The config, when there are no inputs.
    pub config: Option<ContractsConfig>,
    /// The other version: a path like the inputs, or a git ref.
    pub against: String,
    pub categories: Vec<Category>,
    pub format: Format,
}

/// What a comparison found.
pub struct Outcome {
    pub breaking: Vec<Finding>,
    pub tightened: Vec<Tightened>,
}

impl Outcome {
    /// The findings, one per line, and a summary for standard error.
    pub fn render(&self, format: Format, request: &Request) -> (String, String) {
        let errors = self.breaking.iter().map(|f| Shown {
            file: &f.file,
            line_column: f.line_column,
            rule: f.rule.id().to_string(),
            message: &f.message,
            severity: "error",
        });
        let warnings = self.tightened.iter().map(|t| Shown {
            file: &t.file,
            line_column: t.line_column,
            rule: format!("POLICY_{}", t.field.to_uppercase()),
            message: &t.message,
            severity: "warning",
        });
        let out = errors.chain(warnings).map(|shown| shown.line(format)).collect();
        let categories: Vec<String> = request.categories.iter().map(ToString::to_string).collect();
        let summary = format!(
            "{} breaking change(s) by {} against {}, {} policy change(s) that refuse more",
            self.breaking.len(),
            categories.join(", "),
            request.against,
            self.tightened.len()
        );
        (out, summary)
    }
}

/// One finding as the output shows it.
struct Shown<'a> {
    file: &'a str,
    line_column: Option<(u32, u32)>,
    rule: String,
    message: &'a str,
    severity: &'static str,
}

impl Shown<'_> {
    fn line(&self, format: Format) -> String {
        let Shown { file, line_column, rule, message, severity } = self;
        let (line, column) = line_column.unwrap_or((0, 0));
        match format {
            Format::Text => {
                let place = if line > 0 { format!("{file}:{line}:{column}") } else { file.to_string() };
                let warning = if *severity == "warning" { "warning: " } else { "" };
                format!("{place}: {warning}{message} ({rule})\n")
            }
            Format::Json => {
                let object = json!({
                    "path": file, "start_line": line, "start_column": column,
                    "type": rule, "message": message, "severity": severity,
                });
                format!("{object}\n")
            }
            Format::GithubActions => {
                // A workflow command ends at a newline, and its properties at `,` and `:`: those are escaped.
                let escape = |s: &str| s.replace('%', "%25").replace('\r', "%0D").replace('\n', "%0A");
                let property = |s: &str| escape(s).replace(':', "%3A").replace(',', "%2C");
                let place = if line > 0 { format!(",line={line},col={column}") } else { String::new() };
                format!("::{severity} file={}{place},title={rule}::{}\n", property(file), escape(message))
            }
        }
    }
}

pub fn run(request: &Request) -> Result<Outcome, String> {
    let spec = Spec::of(request)?;
    let new = spec.load()?;
    let old = match against(&request.against)? {
        Against::Path(path) => Spec::of_inputs(&[path], &request.include)?.load(),
        Against::GitRef(reference) => {
            let exported =
                tempfile::tempdir().map_err(|e| format!("--against {reference}: a temporary directory: {e}"))?;
            let top = export(&reference, &spec.roots(), exported.path())?;
            spec.rebased(&top, exported.path())?.load()
        }
    }
    .map_err(|e| format!("--against {}: {e}", request.against))?;
    let rules = Rule::of(&request.categories);
    let mut breaking = compare(old.descriptors(), new.descriptors(), &rules);
    let mut tightened = tightened(&old, &new);
    for file in breaking.iter_mut().map(|f| &mut f.file).chain(tightened.iter_mut().map(|t| &mut t.file)) {
        *file = spec.path_of(file);
    }
    Ok(Outcome { breaking, tightened })
}

/// The contracts one side reads.
struct Spec {
    /// Directories whose every `.proto` file is read (each also an include root).
    dirs: Vec<PathBuf>,
    /// The rest as the loader reads it: `.proto` files by name, include roots, descriptor sets.
    config: ContractsConfig,
}

impl Spec {
    fn of(request: &Request) -> Result<Spec, String> {
        if !request.inputs.is_empty() {
            return Spec::of_inputs(&request.inputs, &request.include);
        }
        match &request.config {
            Some(config) => Ok(Spec { dirs: Vec::new(), config: config.clone() }),
            None => Err("name the contracts: .proto files, directories of them or descriptor sets, or a --config \
                 whose contracts section names them"
                .into()),
        }
    }

    /// A directory is an include root whose every `.proto` file is read; a
    /// `.proto` file is read from the `--include` that holds it, or else from
    /// its directory; any other file is a descriptor set.
    fn of_inputs(inputs: &[PathBuf], include: &[PathBuf]) -> Result<Spec, String> {
        let mut config =
            ContractsConfig { mode: ContractMode::Strict, include: include.to_vec(), ..Default::default() };
        let mut dirs = Vec::new();
        for input in inputs {
            let metadata = std::fs::metadata(input).map_err(|e| format!("{}: {e}", input.display()))?;
            if metadata.is_dir() {
                if protos_under(input)?.is_empty() {
                    return Err(format!("{}: holds no .proto file", input.display()));
                }
                dirs.push(input.clone());
            } else if input.extension().is_some_and(|e| e == "proto") {
                let root = include.iter().find(|dir| input.starts_with(dir)).cloned();
                let root = root.unwrap_or_else(|| input.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf));
                config.protos.push(input.strip_prefix(&root).unwrap_or(input).to_path_buf());
                if !config.include.contains(&root) {
                    config.include.push(root);
                }
            } else {
                config.descriptor_sets.push(input.clone());
            }
        }
        Ok(Spec { dirs, config })
    }

    fn load(&self) -> Result<Contracts, String> {
        let mut config = self.config.clone();
        for dir in &self.dirs {
            config.include.push(dir.clone());
            config.protos.extend(protos_under(dir)?);
        }
        Contracts::load(&config).map_err(|e| e.to_string())
    }

    /// A file by its import name as a path the user knows (`proto/shop.proto`
    /// for `shop.proto` of the input `proto/`), so that editors and CI
    /// annotations find it; a file that is not on disk keeps its name.
    fn path_of(&self, name: &str) -> String {
        let roots = self.dirs.iter().chain(&self.config.include);
        let on_disk = roots.clone().map(|root| root.join(name)).find(|path| path.exists());
        let deleted = || self.dirs.first().map(|dir| dir.join(name));
        on_disk.or_else(deleted).map_or_else(|| name.to_string(), |path| path.display().to_string())
    }

    /// The include roots besides the input directories: as the config says,
    /// or the working directory when neither names one.
    fn includes(&self) -> Vec<PathBuf> {
        if self.dirs.is_empty() { self.config.include_dirs() } else { self.config.include.clone() }
    }

    /// The directories and files this side reads from.
    fn roots(&self) -> Vec<PathBuf> {
        let mut roots = self.includes();
        roots.extend(self.dirs.iter().cloned());
        roots.extend(self.config.descriptor_sets.iter().cloned());
        roots
    }

    /// The same contracts read from `exported`, a copy of the repository at
    /// `top` as another version has it. What that version lacks (a file the
    /// change adds) is left out, to be found added.
    fn rebased(&self, top: &Path, exported: &Path) -> Result<Spec, String> {
        let moved = |path: &PathBuf| -> Result<PathBuf, String> { Ok(exported.join(in_repository(path, top)?)) };
        let moved_all = |paths: &[PathBuf]| paths.iter().map(moved).collect::<Result<Vec<_>, _>>();
        let mut config = self.config.clone();
        config.include = moved_all(&self.includes())?;
        config.descriptor_sets = moved_all(&self.config.descriptor_sets)?.into_iter().filter(|p| p.exists()).collect();
        let pattern = |name: &Path| name.to_string_lossy().contains(['*', '?', '[']);
        config.protos.retain(|name| pattern(name) || config.include.iter().any(|dir| dir.join(name).exists()));
        config.mode = ContractMode::Permissive;
        let dirs = moved_all(&self.dirs)?.into_iter().filter(|dir| dir.is_dir()).collect();
        Ok(Spec { dirs, config })
    }
}

/// Every `.proto` file under `dir`, relative to it.
fn protos_under(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let pattern = dir.join("**").join("*.proto");
    let options = glob::MatchOptions { require_literal_leading_dot: true, ..Default::default() };
    let paths = glob::glob_with(&pattern.to_string_lossy(), options).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut found: Vec<PathBuf> =
        paths.flatten().filter_map(|path| path.strip_prefix(dir).ok().map(Path::to_path_buf)).collect();
    found.sort();
    Ok(found)
}

enum Against {
    Path(PathBuf),
    GitRef(String),
}

fn against(value: &str) -> Result<Against, String> {
    if Path::new(value).exists() {
        return Ok(Against::Path(value.into()));
    }
    let verified = git(&["rev-parse", "--verify", "--quiet", &format!("{value}^{{commit}}")], None);
    match verified {
        Ok(_) => Ok(Against::GitRef(value.to_string())),
        Err(why) => Err(format!(
            "--against {value}: no such file or directory, and not a git commit here ({why}); name a path to the \
             other contracts, or a branch, tag or commit of this repository"
        )),
    }
}

/// Runs git here, feeding `input`; its standard output, or why it failed.
// git is run rather than linked: a CI checkout has it, with the user's config and credentials.
fn git(args: &[&str], input: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let mut child = Command::new("git")
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        let input = input.to_vec();
        // Written from a thread: git answers while it reads, and both pipes would fill.
        std::thread::spawn(move || stdin.write_all(&input));
    }
    let output = child.wait_with_output().map_err(|e| format!("git: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        return Err(if stderr.is_empty() { format!("git {} failed", args.join(" ")) } else { stderr });
    }
    Ok(output.stdout)
}

/// `path` relative to the repository's top, whether or not it exists now.
fn in_repository(path: &Path, top: &Path) -> Result<PathBuf, String> {
    let absolute = std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let absolute = absolute.canonicalize().unwrap_or(absolute);
    absolute
        .strip_prefix(top)
        .map(Path::to_path_buf)
        .map_err(|_| format!("{}: not in the git repository at {}", path.display(), top.display()))
}

/// Writes the `.proto` files under `roots` (and the roots that are files) as
/// they are at `reference` into `into`, at their paths in the repository;
/// returns the repository's top.
fn export(reference: &str, roots: &[PathBuf], into: &Path) -> Result<PathBuf, String> {
    let top = git(&["rev-parse", "--show-toplevel"], None).map_err(|e| format!("--against {reference}: {e}"))?;
    let top = PathBuf::from(String::from_utf8_lossy(&top).trim());
    let top = top.canonicalize().unwrap_or(top);
    let mut wanted = BTreeSet::new();
    for root in roots {
        let relative = in_repository(root, &top)?;
        let relative = if relative.as_os_str().is_empty() { PathBuf::from(".") } else { relative };
        let listed = git(
            &[
                "-C",
                &top.to_string_lossy(),
                "ls-tree",
                "-r",
                "-z",
                "--name-only",
                reference,
                "--",
                &relative.to_string_lossy(),
            ],
            None,
        )
        .map_err(|e| format!("--against {reference}: {e}"))?;
        let names = listed.split(|&b| b == 0).filter(|name| !name.is_empty());
        let is_file = root.is_file() || root.extension().is_some_and(|e| e != "proto");
        for name in names.map(|name| String::from_utf8_lossy(name).into_owned()) {
            if is_file || name.ends_with(".proto") {
                wanted.insert(name);
            }
        }
    }
    let request: String = wanted.iter().map(|name| format!("{reference}:{name}\n")).collect();
    let top_arg = top.to_string_lossy().into_owned();
    let mut batch: &[u8] = &git(&["-C", &top_arg, "cat-file", "--batch"], Some(request.as_bytes()))
        .map_err(|e| format!("--against {reference}: {e}"))?;
    for name in &wanted {
        // Each object is `<oid> <type> <size>\n<bytes>\n`.
        let header_end = batch.iter().position(|&b| b == b'\n').ok_or("git cat-file: a truncated answer")?;
        let header = String::from_utf8_lossy(&batch[..header_end]).into_owned();
        let size: usize = header
            .rsplit(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("--against {reference}: git cat-file answered {header:?} for {name}"))?;
        let body = batch.get(header_end + 1..header_end + 1 + size).ok_or("git cat-file: a truncated answer")?;
        let path = into.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::File::create(&path)
            .and_then(|mut file| file.write_all(body))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        batch = batch.get(header_end + 1 + size + 1..).unwrap_or_default();
    }
    Ok(top)
}
