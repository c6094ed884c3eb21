//! `protomesh check --breaking`: the rules cross-checked against buf on the
//! contract pairs of `tests/breaking/cases.txt`, and the command as a CI
//! step runs it: against a git ref, a directory or a descriptor set, in each
//! output format, with policy warnings, and with bad input.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use protomesh::contract::breaking::{Category, Rule, compare};
use protomesh::contract::{Contracts, ContractsConfig};

const BIN: &str = env!("CARGO_BIN_EXE_protomesh");

/// One pair of contract versions and the rules it breaks.
struct Case {
    name: String,
    expect: BTreeSet<String>,
    /// What buf reports instead, where the two differ on purpose.
    buf: Option<BTreeSet<String>>,
    old: Vec<(String, String)>,
    new: Vec<(String, String)>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/breaking/cases.txt")).unwrap();
    let rules = |list: &str| list.split_whitespace().map(str::to_string).collect();
    let mut cases: Vec<Case> = Vec::new();
    let mut file: Option<(bool, usize)> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("== ") {
            let case = Case { name: name.into(), expect: BTreeSet::new(), buf: None, old: vec![], new: vec![] };
            cases.push(case);
            file = None;
            continue;
        }
        let Some(case) = cases.last_mut() else { continue };
        if let Some(side) = line.strip_prefix("-- ") {
            let (side, name) = side.split_once(' ').unwrap();
            let files = if side == "old" { &mut case.old } else { &mut case.new };
            files.push((name.to_string(), String::new()));
            file = Some((side == "old", files.len() - 1));
        } else if let Some((old, index)) = file {
            let files = if old { &mut case.old } else { &mut case.new };
            files[index].1 += &format!("{line}\n");
        } else if let Some(list) = line.strip_prefix("expect:") {
            case.expect = rules(list);
        } else if let Some(list) = line.strip_prefix("buf:") {
            case.buf = Some(rules(list));
        } else {
            assert!(line.starts_with("why: ") || line.is_empty(), "{}: cannot read {line:?}", case.name);
        }
    }
    cases
}

fn write_all(dir: &Path, files: &[(String, String)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

fn load(dir: &Path) -> Contracts {
    let protos = std::fs::read_dir(dir).unwrap().map(|e| PathBuf::from(e.unwrap().file_name()));
    let protos = protos.filter(|p| p.extension().is_some_and(|e| e == "proto")).collect();
    let config = ContractsConfig { protos, include: vec![dir.into()], ..Default::default() };
    Contracts::load(&config).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn buf() -> PathBuf {
    let buf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node/node_modules/.bin/buf");
    assert!(buf.exists(), "the cross-check runs buf from npm: npm ci --prefix tests/node");
    buf
}

/// The rules buf reports with all four categories in use. Each rule is
/// checked on its own, so a category's verdict with only its own rules in use
/// is whether any of these is in that category.
fn buf_rules(buf: &Path, dir: &Path) -> BTreeSet<String> {
    for side in ["old", "new"] {
        std::fs::write(
            dir.join(side).join("buf.yaml"),
            "version: v2\nbreaking:\n  use: [FILE, PACKAGE, WIRE_JSON, WIRE]\n",
        )
        .unwrap();
    }
    let output = Command::new(buf)
        .args(["breaking", "new", "--against", "old", "--error-format", "json"])
        .current_dir(dir)
        .output()
        .unwrap();
    let code = output.status.code();
    assert!(matches!(code, Some(0 | 100)), "buf: {}", String::from_utf8_lossy(&output.stderr));
    let lines = String::from_utf8(output.stdout).unwrap();
    lines
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["type"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_contract_pair_breaks_the_rules_it_names_and_buf_agrees() {
    let buf = buf();
    let cases = cases();
    assert!(cases.len() > 50, "{} cases", cases.len());
    let every_rule: BTreeSet<&str> = Rule::ALL.iter().map(|r| r.id()).collect();
    let named: BTreeSet<&str> = cases.iter().flat_map(|c| c.expect.iter().map(String::as_str)).collect();
    assert_eq!(every_rule.difference(&named).collect::<Vec<_>>(), Vec::<&&str>::new(), "rules no case breaks");

    let all = Rule::of(&[Category::File, Category::Package, Category::WireJson, Category::Wire]);
    let checked = |case: &Case| -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        write_all(&dir.path().join("old"), &case.old);
        write_all(&dir.path().join("new"), &case.new);
        let (old, new) = (load(&dir.path().join("old")), load(&dir.path().join("new")));
        let found: BTreeSet<String> =
            compare(old.descriptors(), new.descriptors(), &all).iter().map(|f| f.rule.id().to_string()).collect();
        let mut wrong = Vec::new();
        if found != case.expect {
            wrong.push(format!("{}: protomesh found {found:?}, not {:?}", case.name, case.expect));
        }
        let by_buf = buf_rules(&buf, dir.path());
        let expected = case.buf.as_ref().unwrap_or(&case.expect);
        if &by_buf != expected {
            wrong.push(format!("{}: buf found {by_buf:?}, not {expected:?}", case.name));
        }
        wrong
    };
    // buf takes a tenth of a second a run: the cases run four at a time.
    let wrong: Vec<String> = std::thread::scope(|scope| {
        let runs: Vec<_> = cases
            .chunks(cases.len().div_ceil(4))
            .map(|chunk| scope.spawn(move || chunk.iter().flat_map(checked).collect::<Vec<_>>()))
            .collect();
        runs.into_iter().flat_map(|run| run.join().unwrap()).collect()
    });
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN).args(args).current_dir(dir).output().unwrap()
}

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

const SHOP_V1: &str = r#"syntax = "proto3";
package shop.v1;
import "protomesh/v1/options.proto";

message Item { string sku = 1; int32 count = 2; }

service Cart {
  option (protomesh.v1.service) = { allowed_callers: ["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/admin"] };
  rpc Add(Item) returns (Item) {
    option (protomesh.v1.method) = { timeout: "2s", concurrency: { max_in_flight: 100 } };
  }
  rpc Remove(Item) returns (Item);
}
"#;

fn repository() -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(repo.path().join("proto/shop")).unwrap();
    std::fs::write(repo.path().join("proto/shop/cart.proto"), SHOP_V1).unwrap();
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "."]);
    git(repo.path(), &["commit", "-q", "-m", "v1"]);
    repo
}

#[test]
fn a_change_is_checked_against_the_main_branch_as_ci_would() {
    let repo = repository();
    let cart = repo.path().join("proto/shop/cart.proto");
    let changed = SHOP_V1
        .replace("int32 count = 2;", "int64 count = 2;")
        .replace("  rpc Remove(Item) returns (Item);\n", "")
        .replace("timeout: \"2s\"", "timeout: \"500ms\"")
        .replace(", \"spiffe://cluster.local/ns/shop/sa/admin\"", "");
    std::fs::write(&cart, changed).unwrap();
    // A file the change adds is no break: main lacks it.
    std::fs::write(
        repo.path().join("proto/shop/wishlist.proto"),
        "syntax = \"proto3\"; package shop.v1; message Wish {}",
    )
    .unwrap();

    let output = run(repo.path(), &["check", "--breaking", "proto", "--against", "main"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(100), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "proto/shop/cart.proto:5:32: field 2 \"count\" of message shop.v1.Item changed type from int32 to int64 \
             (FIELD_SAME_TYPE)",
            "proto/shop/cart.proto:7:1: method /shop.v1.Cart/Remove was deleted (RPC_NO_DELETE)",
            "proto/shop/cart.proto:9:3: warning: method /shop.v1.Cart/Add: allowed_callers no longer allows \
             spiffe://cluster.local/ns/shop/sa/admin (POLICY_ALLOWED_CALLERS)",
            "proto/shop/cart.proto:9:3: warning: method /shop.v1.Cart/Add: timeout lowered from 2s to 500ms (POLICY_TIMEOUT)",
        ]
    );
    assert_eq!(stderr.trim(), "2 breaking change(s) by FILE against main, 2 policy change(s) that refuse more");

    let output = run(
        repo.path(),
        &[
            "check",
            "--breaking",
            "proto",
            "--against",
            "main",
            "--category",
            "WIRE_JSON",
            "--error-format",
            "github-actions",
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(100), "{stdout}");
    assert!(
        stdout.starts_with(
            "::error file=proto/shop/cart.proto,line=5,col=32,title=FIELD_WIRE_JSON_COMPATIBLE_TYPE::field 2 \"count\" of \
             message shop.v1.Item changed type from int32 to int64"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("RPC_NO_DELETE"), "WIRE_JSON does not hold a deleted method breaking: {stdout}");

    let output = run(repo.path(), &["check", "--breaking", "proto", "--against", "HEAD", "--error-format", "json"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let found: Vec<serde_json::Value> = stdout.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(found[1]["type"], "RPC_NO_DELETE");
    assert_eq!((found[1]["path"].as_str(), found[1]["start_line"].as_u64()), (Some("proto/shop/cart.proto"), Some(7)));
    assert_eq!((found[1]["severity"].as_str(), found[3]["severity"].as_str()), (Some("error"), Some("warning")));

    // Only the policy tightened: warnings, and the check passes.
    std::fs::write(&cart, SHOP_V1.replace("max_in_flight: 100", "max_in_flight: 10")).unwrap();
    let output = run(repo.path(), &["check", "--breaking", "proto", "--against", "main"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("warning: method /shop.v1.Cart/Add: concurrency lowered from"), "{stdout}");
}

#[test]
fn a_sidecar_config_compares_its_own_contracts_and_a_directory_or_descriptor_set_stands_for_the_old_version() {
    let repo = repository();
    let config = repo.path().join("sidecar.yaml");
    std::fs::write(&config, "contracts: {protos: [\"shop/*.proto\"], include: [proto]}\n").unwrap();
    std::fs::write(repo.path().join("proto/shop/cart.proto"), SHOP_V1.replace("string sku = 1;", "")).unwrap();
    let output = run(repo.path(), &["check", "--config", "sidecar.yaml", "--breaking", "--against", "main"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(100), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        stdout.starts_with(
            "proto/shop/cart.proto:5:1: field 1 \"sku\" of message shop.v1.Item was deleted (FIELD_NO_DELETE)"
        ),
        "{stdout}"
    );

    // The old version as a directory, then as a descriptor set (which has no lines to name).
    let old = repo.path().join("old");
    std::fs::create_dir_all(old.join("shop")).unwrap();
    std::fs::write(old.join("shop/cart.proto"), SHOP_V1).unwrap();
    let from_dir = run(repo.path(), &["check", "--breaking", "proto", "--against", "old"]);
    assert_eq!(from_dir.stdout, output.stdout);
    let options = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let mut compiler = protox::Compiler::new([&old, &options]).unwrap();
    compiler.include_imports(true);
    compiler.open_file("shop/cart.proto").unwrap();
    std::fs::write(repo.path().join("old.binpb"), compiler.encode_file_descriptor_set()).unwrap();
    let from_set = run(repo.path(), &["check", "--breaking", "proto", "--against", "old.binpb"]);
    assert_eq!(from_set.stdout, output.stdout, "the new side's lines, whatever the old side is");
}

#[test]
fn bad_input_is_named_and_nothing_is_compared() {
    let repo = repository();
    let failed = |args: &[&str]| {
        let output = run(repo.path(), args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(output.stdout.is_empty());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let error = failed(&["check", "--breaking", "proto", "--against", "no-such-branch"]);
    assert!(
        error.contains("--against no-such-branch: no such file or directory, and not a git commit here")
            && error.contains("name a path to the other contracts, or a branch, tag or commit"),
        "{error}"
    );
    let error = failed(&["check", "--breaking", "protos", "--against", "main"]);
    assert!(error.contains("protos: No such file or directory"), "{error}");
    std::fs::write(repo.path().join("proto/shop/cart.proto"), "syntax = \"proto3\"; message M { Nope n = 1; }")
        .unwrap();
    let error = failed(&["check", "--breaking", "proto", "--against", "main"]);
    assert!(error.contains("shop/cart.proto") && error.contains("Nope"), "{error}");
    let error = failed(&["check", "--breaking", "--against", "main"]);
    assert!(error.contains("name the contracts"), "{error}");
    let usage = run(repo.path(), &["check", "--breaking"]);
    assert_eq!(usage.status.code(), Some(2), "clap: --breaking needs --against");
}
