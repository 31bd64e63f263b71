"""The typed config: YAML + --set overrides, strict keys and types, data-contract checks."""
import pytest

from satrank.jobs.config import DEFAULT_CONFIG, load_config
from satrank.pipeline.config import ConfigError, dump, load_yaml


def test_embedded_default_loads_with_every_section_typed():
    cfg = load_config()
    assert cfg.reader.batch_size > 0
    assert cfg.data.sparse_names[:2] == ["user_id", "item_id"]
    assert {f.table for f in cfg.data.sequence} == {"item"}


def test_set_overrides_scalars_and_named_list_items():
    cfg = load_config(overrides=["reader.batch_size=7", "data.sparse.author_id.vocab_size=99",
                                 "reader.on_bad_row=skip"])
    assert cfg.reader.batch_size == 7
    assert cfg.data.feature("author_id").vocab_size == 99
    assert cfg.reader.on_bad_row == "skip"


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(overrides=["reader.batch_sise=7"])


def test_wrong_type_is_an_error_naming_the_path():
    with pytest.raises(ConfigError, match=r"reader\.batch_size"):
        load_config(overrides=["reader.batch_size=many"])
    with pytest.raises(ConfigError, match="on_bad_row"):
        load_config(overrides=["reader.on_bad_row=ignore"])


def test_exponent_notation_without_a_dot_is_a_number_for_float_keys():
    # PyYAML (YAML 1.1) reads 1e-3 as the string '1e-3'; a float key takes it as the number
    cfg = load_config(overrides=["easq.lr=1e-3", "easq.alpha=5E+1", "train.dense_lr=+2.5e-4"])
    assert (cfg.easq.lr, cfg.easq.alpha, cfg.train.dense_lr) == (1e-3, 50.0, 2.5e-4)
    for bad in ("1e-3x", "e-3", "1e"):
        with pytest.raises(ConfigError, match=r"easq\.lr: expected a number"):
            load_config(overrides=[f"easq.lr={bad}"])
    with pytest.raises(ConfigError, match=r"reader\.batch_size: expected an integer"):
        load_config(overrides=["reader.batch_size=1e3"])  # an int key stays strict


def test_each_training_job_has_its_own_train_overrides():
    from satrank.jobs.engine.readers import stage_train_config

    cfg = load_config(overrides=["dpo_train.dense_lr=0.01", "ranker_train.dense_lr=0.002", "train.seed=7"])
    dpo, ranker = stage_train_config(cfg, "dpo"), stage_train_config(cfg, "ranker")
    assert (dpo.dense_lr, ranker.dense_lr) == (0.01, 0.002)
    assert dpo.seed == ranker.seed == 7 and load_config().dpo_train.dense_lr is None  # null inherits train:


def test_features_sharing_a_table_must_agree_on_rows():
    with pytest.raises(ConfigError, match="sharing table 'item'"):
        load_config(overrides=["data.sequence.hist_click.vocab_size=10"])


def test_a_feature_may_not_read_a_ground_truth_column():
    with pytest.raises(ConfigError, match="ground-truth column"):
        load_config(overrides=["data.dense.duration_s.column=true_p_click"])


def test_oov_policy_adds_one_table_row():
    cfg = load_config()
    cat = cfg.data.feature("category_id")
    assert cat.out_of_range == "oov" and cat.num_rows == cat.vocab_size + 1
    assert cfg.data.feature("item_id").num_rows == cfg.data.feature("item_id").vocab_size


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["reader.seed=5"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump(cfg))
    assert load_config(path) == cfg


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_yaml("nope.yaml")
    assert DEFAULT_CONFIG.is_file()


def test_a_config_that_extends_another_states_only_what_differs(tmp_path):
    """`extends:` deep-merges: mappings key by key, lists and scalars replaced whole; cycles and bad values named."""
    from satrank.pipeline.config import load_yaml

    (tmp_path / "base.yaml").write_text("a: {x: 1, y: [1, 2]}\nb: 2\n")
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\na: {y: [3]}\n")
    (tmp_path / "top.yaml").write_text("extends: mid.yaml\na: {z: 4}\nc: 5\n")
    assert load_yaml(tmp_path / "top.yaml") == {"a": {"x": 1, "y": [3], "z": 4}, "b": 2, "c": 5}
    (tmp_path / "loop.yaml").write_text("extends: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_yaml(tmp_path / "loop.yaml")
    (tmp_path / "bad.yaml").write_text("extends: [a, b]\n")
    with pytest.raises(ConfigError, match="extends must name one config file"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "gone.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml' does not exist"):
        load_yaml(tmp_path / "gone.yaml")
    alt = load_config(DEFAULT_CONFIG.parent / "sim_alt.yaml")  # the alternative world: sim.yaml + simulate keys
    assert alt.simulate.sat_w_attractiveness == -0.5 and alt.simulate.users == load_config().simulate.users


def test_heads_that_do_not_divide_the_embedding_dim_are_refused_at_parse_time():
    with pytest.raises(ConfigError, match=r"model\.transformer_heads: 3 must divide the embedding dim 32 of table 'item'"):
        load_config(overrides=["model.transformer_heads=3"])
    with pytest.raises(ConfigError, match=r"model\.transformer_heads: 2 must divide the embedding dim 15"):
        load_config(overrides=["embeddings.tables.item.dim=15"])
    load_config(overrides=["pretrain.tower.transformer_heads=3"])  # mean encoder: heads unused, accepted
    with pytest.raises(ConfigError, match=r"pretrain\.tower\.transformer_heads: 3 must divide"):
        load_config(overrides=["pretrain.tower.transformer_heads=3", "pretrain.tower.history_encoder=transformer"])
