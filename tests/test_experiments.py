"""Tests for vit_tutorial/experiments.py: every experiment's --quick path runs each arm on the
CPU and writes its results; the arms of each experiment differ only where they should."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import vit_tutorial as vt
from vit_tutorial import experiments as ex

NAMES = list(ex.EXPERIMENTS)


@functools.cache
def _data():
    train_x, train_y = vt.load_fashion_mnist("train")
    test_x, test_y = vt.load_fashion_mnist("test")
    return train_x, train_y, test_x[:32], test_y[:32]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("experiments")
    return {name: json.loads(ex.run_experiment(name, out=out, quick=True, data=_data(),
                                               command=f"test {name}").read_text())
            for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_quick_runs_every_arm_once_and_records_it(name, quick_results):
    exp, result = ex.EXPERIMENTS[name], quick_results[name]
    assert result["quick"] and result["seeds"] == [0] and result["command"] == f"test {name}"
    assert [a["name"] for a in result["arms"]] == [a.name for a in exp.arms]
    assert [r["arm"] for r in result["runs"]] == [a.name for a in exp.arms]
    for arm, run in zip(exp.arms, result["runs"], strict=True):
        assert len(run["history"]) == 1 and run["history"][0]["epoch"] == 1
        assert 0 <= run["final"]["accuracy"] <= 1
        assert run["command"].startswith(f"python -m vit_tutorial.train --model {arm.model} ")
        for item in arm.model_args:
            assert f"--model-arg '{item}'" in run["command"] or f"--model-arg {item}" in (
                run["command"])
    for record in result["arms"]:
        assert record["parameters"] > 0 and record["forward_flops"] > 0


def test_arms_differ_only_where_the_experiment_says():
    def configs(name):
        return [arm.config().to_dict() for arm in ex.EXPERIMENTS[name].arms]

    def differing(dicts):
        return {k for k in dicts[0] if len({json.dumps(d[k]) for d in dicts}) > 1}

    assert differing(configs("pos_embed")) == {"pos_embed"}
    assert differing(configs("pool")) == {"class_token", "pool"}
    lrs = [dict(zip(a.train_args[::2], a.train_args[1::2], strict=True)).get("--lr", "1e-3")
           for a in ex.EXPERIMENTS["pool"].arms]
    assert lrs == ["1e-3", "1e-3", "3e-4", "3e-4"]
    # T2T ablation: one backbone, three tokenizers, 49 tokens each
    t2t = configs("t2t_tokenizer")
    backbone = {"embed_dim", "depth", "num_heads", "mlp_ratio", "pos_embed", "qkv_bias",
                "class_token", "pool", "norm_eps"} - {"norm_eps"}
    assert not differing([{k: c[k] for k in backbone} for c in t2t])
    assert [vt.ViTConfig.from_dict(c).grid_size for c in t2t] == [(7, 7)] * 3
    # the budgets of the hybrid experiment: the same three for both models
    arms = ex.EXPERIMENTS["hybrid_budget"].arms
    assert sorted((a.epochs, a.model) for a in arms) == sorted(
        (e, m) for e in (2, 4, 12) for m in ("vit_mini_patch4_28", "vit_mini_r26_s4_28"))


def test_deep_narrow_and_shallow_wide_match_in_parameters():
    deep, wide = (vt.count_parameters(vt.VisionTransformer(a.config()))
                  for a in ex.EXPERIMENTS["deep_narrow"].arms)
    assert abs(deep - wide) / deep < 0.05, (deep, wide)
    d, w = (a.config() for a in ex.EXPERIMENTS["deep_narrow"].arms)
    assert (d.depth, d.embed_dim) == (12, 192) and (w.depth, w.embed_dim) == (3, 384)


def test_forward_flops_count_the_written_out_attention():
    model = vt.create_model("vit_nano_patch4_28")
    D, L, N, K = 64, 4, 50, 10  # 49 patches + the class token
    per_block = 2 * N * D * 3 * D + 2 * N * D * D + 2 * 2 * N * D * 2 * D + 4 * N * N * D
    patch = 2 * 49 * 16 * D  # the 4x4 patch projection
    assert ex.forward_flops(model) == patch + L * per_block + 2 * D * K
    assert all(m.fused for m in model.modules() if hasattr(m, "fused"))  # restored


def test_unknown_experiment_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown experiment 'pos'; expected one of"):
        ex.run_experiment("pos", out=tmp_path, quick=True)
    with pytest.raises(SystemExit):
        ex.main(["pos"])
    assert "unknown experiments ['pos']" in capsys.readouterr().err
    assert torch.is_tensor(_data()[0])


def _fake_result(accuracies: dict[str, list[float]]) -> dict:
    return {"experiment": "fake", "arms": [{"name": n} for n in accuracies],
            "runs": [{"arm": n, "seed": s, "final": {"accuracy": a}}
                     for n, accs in accuracies.items() for s, a in enumerate(accs)]}


def test_compare_counts_a_difference_only_beyond_two_standard_deviations():
    result = _fake_result({"a": [0.90, 0.91, 0.92], "b": [0.87, 0.88, 0.89], "c": [0.70] * 3})
    assert ex.final_accuracies(result) == {"a": [0.90, 0.91, 0.92], "b": [0.87, 0.88, 0.89],
                                           "c": [0.70] * 3}
    ab = ex.compare(result, "a", "b")
    # means 0.91 and 0.88; both sample std 0.01, pooled 0.01: 0.03 is three of them
    assert abs(ab["difference"] - 0.03) < 1e-12 and abs(ab["pooled_std"] - 0.01) < 1e-12
    assert ab["resolved"] is True
    near = ex.compare(_fake_result({"a": [0.90, 0.91, 0.92], "b": [0.895, 0.905, 0.915]}),
                      "a", "b")
    assert near["resolved"] is False  # 0.005 apart, spread 0.01
    assert ex.compare(result, "a", "c")["resolved"] is True
    with pytest.raises(ValueError, match=r"no arm 'd' in fake; arms: \['a', 'b', 'c'\]"):
        ex.compare(result, "a", "d")
    with pytest.raises(ValueError, match="has 1 run; a spread needs two"):
        ex.compare(_fake_result({"a": [0.9], "b": [0.8, 0.7]}), "a", "b")


def test_load_results_names_the_command_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m vit_tutorial.experiments pool"):
        ex.load_results("pool", tmp_path)


def test_summarize_prints_each_arm_with_mean_std_and_seeds():
    result = _fake_result({"a": [0.90, 0.91, 0.92], "bb": [0.87, 0.88, 0.89]})
    result.update(claim="A claim.", seeds=[0, 1, 2])
    for i, arm in enumerate(result["arms"]):
        arm.update(parameters=1234567 + i, forward_flops=2.5e8, epochs=8)
    lines = ex.summarize(result).splitlines()
    assert lines[0] == "fake: A claim."
    assert lines[1].startswith("arm ") and lines[1].endswith("(seeds 0, 1, 2)")
    assert lines[2].split() == ["a", "1,234,567", "0.250", "8", "0.9100", "+-", "0.0100",
                                "(0.9000,", "0.9100,", "0.9200)"]
    assert lines[3].split()[:7] == ["bb", "1,234,568", "0.250", "8", "0.8800", "+-", "0.0100"]


SHIPPED = [name for name in NAMES if (vt.data.DATA_DIR / "experiments" / f"{name}.json").exists()]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_results_hold_every_arm_and_seed_of_the_experiment(name):
    """data/experiments/NAME.json is what `python -m vit_tutorial.experiments NAME` writes:
    every arm x seed, each run as long as its arm's budget, its command that of the arm."""
    exp, result = ex.EXPERIMENTS[name], ex.load_results(name)
    assert not result["quick"] and result["epochs_override"] is None and result["gpu"]
    assert result["seeds"] == list(exp.seeds) and result["recipe"] == list(ex.RECIPE)
    assert result["command"].startswith("python -m vit_tutorial.experiments ")
    assert name in result["command"].split()
    assert [a["name"] for a in result["arms"]] == [a.name for a in exp.arms]
    runs = {(r["arm"], r["seed"]): r for r in result["runs"]}
    assert len(runs) == len(result["runs"]) == len(exp.arms) * len(exp.seeds)
    for arm, record in zip(exp.arms, result["arms"], strict=True):
        assert record["epochs"] == (arm.epochs or exp.epochs)
        with torch.device("meta"):
            assert record["parameters"] == vt.count_parameters(vt.VisionTransformer(arm.config()))
        for seed in exp.seeds:
            run = runs[arm.name, seed]
            assert [e["epoch"] for e in run["history"]] == list(range(1, record["epochs"] + 1))
            assert run["final"]["accuracy"] == run["final"]["correct"] / 10_000
            assert run["command"].startswith(f"python -m vit_tutorial.train --model {arm.model} ")
            assert f"--seed {seed} --epochs {record['epochs']} " in run["command"]
            assert run["final"]["command"] == run["command"]


@pytest.mark.skipif("pool" not in SHIPPED, reason="data/experiments/pool.json not shipped")
def test_summary_flag_prints_the_shipped_results(capsys):
    assert ex.main(["--summary", "pool"]) == 0
    out = capsys.readouterr().out
    assert out == ex.summarize(ex.load_results("pool")) + "\n\n"
    assert out.startswith("pool: ViT appendix D.3")


def test_epoch_accuracies_are_each_runs_logged_curve_in_seed_order():
    result = _fake_result({"a": [0.5, 0.6], "b": [0.7, 0.8]})
    for run in result["runs"]:
        run["history"] = [{"epoch": e, "test_acc": run["final"]["accuracy"] - 0.1 * (2 - e)}
                          for e in (1, 2)]
    curves = ex.epoch_accuracies(result)
    assert list(curves) == ["a", "b"]
    assert curves["a"] == [[0.4, 0.5], [0.5, 0.6]]
    assert [c[-1] for c in curves["b"]] == [0.7, 0.8]
