//! `site-node check-data` names the file, row and field of every kind of bad local data,
//! and summarises a good manifest, before any training.

use std::process::Command;

use aln_e2e::*;

/// Runs check-data; returns (success, stdout, stdout + stderr).
fn check(manifest: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(bin("site-node")).args(["check-data", "--image-size", "32", "--manifest"]).arg(manifest).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), stdout, all)
}

#[test]
fn bad_local_data_is_named_by_file_row_and_field() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    run_ok(Command::new(bin("site-node")).args(["synth", "--sites", "1", "--patients", "20", "--image-px", "64", "--out"]).arg(dir.path()))?;
    let site = dir.path().join("site-a");
    let manifest = site.join("manifest.csv");
    let (ok, stdout, all) = check(&manifest);
    assert!(ok, "{all}");
    let summary: serde_json::Value = serde_json::from_str(&stdout)?;
    assert_eq!(summary["patients"], 20);
    assert_eq!(summary["images_checked"], 40);

    let original = std::fs::read_to_string(&manifest)?;
    let lines: Vec<&str> = original.lines().collect();
    // Rewrites data row 3 (line 4) with `edit` and checks the error text.
    let case = |name: &str, edit: &dyn Fn(&mut Vec<String>), expect: &[&str]| -> anyhow::Result<()> {
        let mut fields: Vec<String> = lines[3].split(',').map(str::to_string).collect();
        edit(&mut fields);
        let mut text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        text[3] = fields.join(",");
        let bad = site.join(format!("bad-{name}.csv"));
        std::fs::write(&bad, text.join("\n") + "\n")?;
        let (ok, _, out) = check(&bad);
        assert!(!ok, "{name}: bad data accepted");
        for e in expect {
            assert!(out.contains(e), "{name}: {e:?} not in\n{out}");
        }
        Ok(())
    };
    case("missing-image", &|f| f[1] = "us/nope.png".into(), &["row 3", "us_image", "nope.png"])?;
    std::fs::write(site.join("us/broken.png"), b"not a png")?;
    case("unreadable-png", &|f| f[1] = "us/broken.png".into(), &["row 3", "us_image", "broken.png"])?;
    case("roi-outside", &|f| f[3] = "60".into(), &["row 3", "us_image_roi", "outside"])?;
    case("age-out-of-range", &|f| f[11] = "250".into(), &["row 3", "`age`", "outside"])?;
    case("unknown-class", &|f| f[21] = "N9".into(), &["row 3", "`n_stage`", "allowed values"])?;
    case("missing-roi-value", &|f| f[4] = "".into(), &["row 3", "`us_roi_y`", "empty"])?;
    // Nothing was written next to the manifest by a failed check.
    let leftovers = std::fs::read_dir(&site)?.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.')).count();
    assert_eq!(leftovers, 0);
    Ok(())
}
