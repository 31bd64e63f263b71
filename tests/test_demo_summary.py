"""`make demo` ends with the alignment table: click-only, SAQRec, EASQ after DPO and the two oracles."""
from satrank.jobs.demo import alignment_table, stages


def test_demo_trains_the_click_only_baseline_beside_saqrec(tmp_path):
    names = {name: args for name, _, args in stages(tmp_path, 2, [])}
    assert "--set=model.variant=click_only" in names["click-only"]
    assert names["click-only"][names["click-only"].index("--out") + 1] == str(tmp_path / "click_only")
    assert "--satisfaction" not in names["click-only"]  # click-only uses no g (jobs.train would warn it ignores it)


def test_alignment_table_rows_and_oracle_values():
    saqrec = {"true_sat@10": 0.61, "true_click@10": 0.70, "true_sat@10_headroom_share": 0.25, "hr@10": 0.2,
              "click_auc": 0.73, "true_sat@10_oracle_sat": 0.79, "true_click@10_oracle_sat": 0.49,
              "true_sat@10_oracle_click": 0.55, "true_click@10_oracle_click": 0.76}
    summary = {"train": saqrec, "click-only": {"true_sat@10": 0.42, "click_auc": 0.72},
               "dpo": {"after": {"true_sat@10": 0.63}}}
    lines = alignment_table(summary).splitlines()
    assert lines[0] == "| model | true_sat@10 | true_click@10 | true_sat@10_headroom_share | hr@10 | click_auc |"
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert list(rows) == ["click-only", "SAQRec", "EASQ after DPO", "oracle by true_p_satisfied", "oracle by true_p_click"]
    assert rows["click-only"] == "| click-only | 0.4200 | - | - | - | 0.7200 |"
    assert rows["oracle by true_p_satisfied"] == "| oracle by true_p_satisfied | 0.7900 | 0.4900 | - | - | - |"
    assert rows["oracle by true_p_click"] == "| oracle by true_p_click | 0.5500 | 0.7600 | - | - | - |"
