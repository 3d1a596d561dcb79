"""The lm-evaluation-harness on megalite checkpoints (megalite.eval_harness), offline on the CPU.

One two-process launch prepares nothing but trains three small models on a synthetic corpus with the run's own
BPE tokenizer (a GPT at data-parallel 2, a Llama at tensor-parallel 2, a Mixtral-shaped MoE with its experts split
over expert parallelism 2, all with `train.eval_tasks`), then evaluates the checkpoints through `megalite eval
--tasks` at TP2. The rest runs in this process at TP1 and
compares every request with the harness's own Hugging Face backend on the `megalite convert --to-hf` export.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="the `eval` extra (lm-eval) is not installed")

from megalite import config as C  # noqa: E402
from tests.helpers.distributed import run_ranks  # noqa: E402
from tests.helpers.engine_utils import tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STEPS = 100
MOE_STEPS = 20
MAX_POSITIONS = 64  # contexts and documents longer than this exercise left truncation and rolling windows
TASKS = ["megalite_mc", "megalite_gen", "megalite_ppl", "megalite_sample"]
LLAMA = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "bias": False, "num_kv_heads": 2,
         "tied_embeddings": False}
NOUNS = ["cat", "dog", "bird", "fish", "horse", "mouse", "tree", "river", "stone", "house"]
VERBS = ["sees", "likes", "finds", "eats", "holds", "follows"]
ADJECTIVES = ["red", "small", "old", "quick", "green", "quiet"]


def _sentence(rng: random.Random) -> str:
    return f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}."


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _task_yaml(folder: Path, name: str, files: dict[str, str], body: str) -> None:
    splits = "\n".join(f"    {split}: {folder / file}" for split, file in files.items())
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{splits}\ntest_split: test\n{body}"
        "metadata:\n  version: 1.0\n")


def _write_corpus_and_tasks(root: Path) -> None:
    """A corpus of short sentences of a fixed grammar, prepared with a trained BPE, and four task YAMLs over local
    JSON Lines files: multiple choice (some contexts longer than the model), greedy generation stopping at '.',
    rolling log-likelihood (some documents longer than the model), sampled generation."""
    from megalite.data.prepare import prepare

    rng = random.Random(0)
    docs = [" ".join(_sentence(rng) for _ in range(rng.randint(2, 8))) for _ in range(300)]
    _jsonl(root / "corpus.jsonl", [{"text": t} for t in docs])
    prepare([str(root / "corpus.jsonl")], str(root / "data" / "corpus"), vocab_size=300, progress=False)
    tasks = root / "tasks"
    tasks.mkdir()

    def question(long: bool) -> dict:
        # The right answer continues "the ADJECTIVE" grammatically; the others are the same words reordered.
        context = " ".join(_sentence(rng) for _ in range(30 if long else rng.randint(0, 2)))
        noun, verb, other = rng.choice(NOUNS), rng.choice(VERBS), rng.choice(NOUNS)
        good = f" {noun} {verb} the {other}."
        bad = [f" {verb} {noun} the {other}.", f" the {noun} {other} {verb}.", f" {other} the {verb} {noun}."]
        answer = rng.randrange(4)
        return {"question": (context + " the " + rng.choice(ADJECTIVES)).strip(),
                "choices": bad[:answer] + [good] + bad[answer:], "answer": answer}

    _jsonl(tasks / "mc_test.jsonl", [question(long=i % 4 == 0) for i in range(12)])
    _jsonl(tasks / "mc_train.jsonl", [question(long=False) for _ in range(6)])
    _task_yaml(tasks, "megalite_mc", {"test": "mc_test.jsonl", "train": "mc_train.jsonl"},
               "fewshot_split: train\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
               "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
               "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    prompts = [(_sentence(rng) + " the " + rng.choice(ADJECTIVES), rng.choice(NOUNS)) for _ in range(8)]
    _jsonl(tasks / "gen_test.jsonl", [{"prompt": p, "target": f" {n}"} for p, n in prompts])
    _task_yaml(tasks, "megalite_gen", {"test": "gen_test.jsonl"},
               "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
               "generation_kwargs:\n  until: [\".\"]\n  do_sample: false\n  max_gen_toks: 12\n"
               "metric_list:\n  - metric: exact_match\n")
    _task_yaml(tasks, "megalite_sample", {"test": "gen_test.jsonl"},
               "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
               "generation_kwargs:\n  until: [\"\\n\"]\n  do_sample: true\n  temperature: 1.5\n  top_k: 50\n"
               "  max_gen_toks: 10\nmetric_list:\n  - metric: exact_match\n")
    _jsonl(tasks / "ppl_test.jsonl", [{"text": " ".join(_sentence(rng) for _ in range(n))} for n in (1, 3, 14, 2, 20)])
    _task_yaml(tasks, "megalite_ppl", {"test": "ppl_test.jsonl"},
               "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
               "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    _task_yaml(tasks, "megalite_missing", {"test": "no_such_file.jsonl"},
               "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n")


def _run_config(root: str, name: str) -> dict:
    """GPT at data-parallel 2 (ZeRO-1) or Llama at tensor-parallel 2, both evaluating megalite_mc while training; a
    Mixtral-shaped MoE at expert parallelism 2 (ZeRO-1: each rank holds its experts), evaluating megalite_mc and the
    greedy generation task while training, for MOE_STEPS steps."""
    steps = MOE_STEPS if name == "moe" else STEPS
    tasks = ["megalite_mc", "megalite_gen"] if name == "moe" else ["megalite_mc"]
    raw = tiny_config(f"{root}/data/corpus", f"{root}/{name}", data={"seq_length": 32},
                      train={"steps": steps, "eval_interval": steps // 2, "log_interval": 50,
                             "eval_tasks": {"tasks": tasks, "include_path": f"{root}/tasks", "batch_size": 4}},
                      deepspeed={"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1}},
                      parallel={"tensor": 2 if name == "llama" else 1, "expert": 2 if name == "moe" else 1})
    raw["model"].update(vocab_size=300, max_position_embeddings=MAX_POSITIONS)
    if name in ("llama", "moe"):
        raw["model"].update(LLAMA)
    if name == "moe":
        raw["model"]["moe"] = {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 32, "aux_loss": 0.01}
    return raw


def _train_and_evaluate_tp2(root: str) -> None:
    """On 2 ranks: train both models, then `megalite eval --tasks` of each checkpoint at TP2, and the harness's own
    command line with `--model megalite` at TP2."""
    from megalite.cli import main as cli
    from megalite.engine.trainer import Trainer
    from megalite.eval_harness import harness_cli

    for name in ("gpt", "llama", "moe"):
        code = Trainer(C.from_dict(_run_config(root, name))).train()
        if code != 0:
            raise RuntimeError(f"{name}: training exit code {code}")
    for name in ("gpt", "llama", "moe"):
        code = cli(["eval", "--checkpoint", f"{root}/{name}", "--tasks", ",".join(TASKS), "--include-path",
                    f"{root}/tasks", "--batch-size", "4", "--log-samples", "--output", f"{root}/{name}-tp2.json"])
        if code != 0:
            raise RuntimeError(f"{name}: megalite eval exit code {code}")
    # `python -m megalite.eval_harness ARGS` under torchrun: rank 1 serves rank 0's calls, then leaves (exit 0).
    try:
        harness_cli(["--model", "megalite", "--model_args", f"checkpoint={root}/gpt", "--tasks", "megalite_mc",
                     "--include_path", f"{root}/tasks", "--limit", "4", "--batch_size", "4",
                     "--output_path", f"{root}/harness-cli"])
        code = 0
    except SystemExit as e:
        code = e.code
    if code != 0:
        raise RuntimeError(f"python -m megalite.eval_harness: exit code {code}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("harness")
    _write_corpus_and_tasks(root)
    run_ranks(_train_and_evaluate_tp2, 2, str(root), timeout_s=400, collective_timeout_s=120)
    return root


def _responses(samples: list[dict]) -> dict[tuple[int, int], object]:
    """{(doc id, request index): the model's answer}: (log-likelihood, is greedy), a rolling log-likelihood or a
    generation."""
    out = {}
    for s in samples:
        for i, r in enumerate(s["resps"]):
            value = r[0]
            out[(s["doc_id"], i)] = tuple(value) if isinstance(value, (list, tuple)) else value
    return out


def _compare(ours: dict, theirs: dict, what: str, tasks: list[str]) -> None:
    """Every request within 1e-4, is-greedy flags, generations and task scores equal."""
    for task in tasks:
        a, b = _responses(ours["samples"][task]), _responses(theirs["samples"][task])
        assert a.keys() == b.keys() and a, f"{what} {task}: different requests"
        for key in a:
            x, y = a[key], b[key]
            if isinstance(x, str):
                assert x == y, f"{what} {task} {key}: generation {x!r} != {y!r}"
            elif isinstance(x, tuple):
                assert abs(x[0] - y[0]) <= 1e-4 and x[1] == y[1], f"{what} {task} {key}: {x} != {y}"
            else:
                assert abs(x - y) <= 1e-4, f"{what} {task} {key}: {x} != {y}"
        for metric, value in ours["results"][task].items():
            if isinstance(value, float) and "_stderr" not in metric:
                assert value == pytest.approx(theirs["results"][task][metric], rel=1e-6), f"{what} {task} {metric}"


def _megalite_tp1(checkpoint: Path, tasks_dir: Path, names: list[str], **options) -> dict:
    from megalite import eval_harness as H
    from megalite.generate import load_for_inference

    loaded = load_for_inference(checkpoint)
    lm = H.model_class().for_model(loaded.model, loaded.tokenizer, loaded.eod_token_id, loaded.bos_token_id,
                                   batch_size=4, step_dir=loaded.step_dir)
    manager, resolved = H.find_tasks(names, str(tasks_dir))
    return H.run_tasks(lm, manager, resolved, log_samples=True, bootstrap_iters=0, **options)


def _hf_backend(hf_dir: Path, tasks_dir: Path, names: list[str]) -> dict:
    import lm_eval

    from megalite import eval_harness as H

    manager, resolved = H.find_tasks(names, str(tasks_dir))
    return lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(hf_dir), "device": "cpu",
                                                           "dtype": "float32"},
                                   tasks=H.load_tasks(manager, resolved), task_manager=manager, batch_size=4,
                                   log_samples=True, bootstrap_iters=0)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_tp1_and_tp2_score_every_request_as_the_hf_backend(trained, family, tmp_path):
    from megalite.data.tokenizer import load_tokenizer
    from megalite.interop.export import export_hf

    ours = _megalite_tp1(trained / family, trained / "tasks", TASKS)
    hf = _hf_backend(export_hf(trained / family, tmp_path / "hf"), trained / "tasks", TASKS[:3])  # greedy tasks
    _compare(ours, hf, f"{family} TP1 vs hf", TASKS[:3])
    tp2 = json.loads((trained / f"{family}-tp2.json").read_text())
    _compare(ours, tp2, f"{family} TP1 vs TP2", TASKS)  # sampled generations too: the same seeds

    # The checks above covered what they should: left truncation, several rolling windows, stops at '.'.
    tok = load_tokenizer(trained / "data" / "corpus.tokenizer.json")
    longest_mc = max(len(tok.encode(s["arguments"][0][0]).ids) for s in ours["samples"]["megalite_mc"])
    longest_doc = max(len(tok.encode(s["doc"]["text"]).ids) for s in ours["samples"]["megalite_ppl"])
    assert longest_mc > MAX_POSITIONS and longest_doc > 2 * MAX_POSITIONS
    greedy = [s["resps"][0][0] for s in ours["samples"]["megalite_gen"]]
    assert all(g and "." not in g for g in greedy), greedy  # 12 tokens would run past the first '.'
    sampled = [s["resps"][0][0] for s in ours["samples"]["megalite_sample"]]
    assert len(set(sampled)) > len(sampled) // 2, sampled
    assert 0.5 < ours["results"]["megalite_mc"]["acc,none"] <= 1.0  # trained: the grammatical answer wins


def test_moe_checkpoint_of_split_experts_scores_as_the_hf_backend(trained, tmp_path):
    """The EP2 (ZeRO-1, experts split) checkpoint, consolidated and exported as Mixtral: every request at TP1 as the
    harness's Hugging Face backend scores it, TP2's (`megalite eval --tasks`) as TP1's, sampled generations included;
    `train.eval_tasks` ran at EP2 (the multiple-choice and the greedy generation task, every rank serving each of rank
    0's model calls), and its last scores are those of the saved weights."""
    from megalite.interop.export import export_hf

    hf_dir = export_hf(trained / "moe", tmp_path / "hf")
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "mixtral"
    ours = _megalite_tp1(trained / "moe", trained / "tasks", TASKS)
    _compare(ours, _hf_backend(hf_dir, trained / "tasks", TASKS[:3]), "moe TP1 vs hf", TASKS[:3])
    final = json.loads((trained / "moe-tp2.json").read_text())
    _compare(ours, final, "moe TP1 vs TP2", TASKS)
    records = [json.loads(line) for line in (trained / "moe" / "metrics.jsonl").read_text().splitlines()]
    scores = {r["step"]: r for r in records if r.get("kind") == "eval_tasks"}
    assert sorted(scores) == [MOE_STEPS // 2, MOE_STEPS], records[-3:]
    for metric, key in (("megalite_mc/acc", "megalite_mc"), ("megalite_gen/exact_match", "megalite_gen")):
        assert scores[MOE_STEPS][metric] == final["results"][key][metric.split("/")[1] + ",none"], metric


def test_training_logs_task_scores_of_its_own_weights(trained):
    """train.eval_tasks ran at steps 50 and 100 at DP2 and at TP2 (an `eval_tasks` record each, next to the `valid`
    one); the last score is the saved weights' own."""
    for family in ("gpt", "llama"):
        records = [json.loads(line) for line in (trained / family / "metrics.jsonl").read_text().splitlines()]
        scores = {r["step"]: r["megalite_mc/acc"] for r in records if r.get("kind") == "eval_tasks"}
        valid = {r["step"] for r in records if r.get("kind") == "valid"}
        assert sorted(scores) == sorted(valid) == [STEPS // 2, STEPS], records[-3:]
        final = json.loads((trained / f"{family}-tp2.json").read_text())["results"]["megalite_mc"]["acc,none"]
        assert scores[STEPS] == final


def test_cli_table_limit_fewshot_and_result_file(trained, tmp_path):
    import lm_eval

    from megalite.checkpoint import resolve_checkpoint

    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", "megalite.cli", "eval", "--checkpoint", str(trained / "gpt"),
                           "--tasks", "megalite_mc,megalite_gen", "--include-path", str(trained / "tasks"),
                           "--limit", "3", "--num-fewshot", "2", "--log-samples", "--output", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"})  # DeepSpeed warns
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines and all(line.startswith("|") for line in lines), done.stdout  # only the results table
    assert any("megalite_mc" in line and "acc" in line for line in lines)
    result = json.loads(out.read_text())
    manifest = json.loads((resolve_checkpoint(trained / "gpt") / "manifest.json").read_text())
    assert result["step"] == STEPS and result["harness"] == {"name": "lm-eval", "version": lm_eval.__version__}
    assert result["manifest_body_sha256"] == manifest["body_sha256"]
    assert result["versions"] == {"megalite_mc": 1.0, "megalite_gen": 1.0}
    assert result["n-shot"] == {"megalite_mc": 2, "megalite_gen": 2}
    assert {t: n["effective"] for t, n in result["n-samples"].items()} == {"megalite_mc": 3, "megalite_gen": 3}
    for sample in result["samples"]["megalite_mc"]:
        prompt = sample["arguments"][0][0]
        assert prompt.count("\n\n") == 2 and prompt.endswith(sample["doc"]["question"])  # two examples first


def test_unknown_task_and_missing_data_are_named(trained, capsys, monkeypatch):
    from megalite.cli import main as cli
    from megalite.eval_harness import harness_cli

    base = ["eval", "--checkpoint", str(trained / "gpt"), "--include-path", str(trained / "tasks")]
    assert cli([*base, "--tasks", "megalite_mcc"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'megalite_mcc'" in err and "close names: megalite_mc" in err, err
    assert cli([*base, "--tasks", "megalite_missing"]) == 2
    err = capsys.readouterr().err
    assert "task 'megalite_missing' (" in err and "its data could not be loaded" in err, err
    assert "Check the files its dataset_kwargs.data_files names" in err  # a local file: no cache advice
    assert "Traceback" not in err
    monkeypatch.setattr(sys, "argv", ["python -m megalite.eval_harness"])  # harness_cli sets the harness's argv
    with pytest.raises(SystemExit) as e:  # the harness's own command line: one line and exit 2 as well
        harness_cli(["--model", "megalite", "--model_args", f"checkpoint={trained / 'nowhere'}", "--tasks",
                     "megalite_mc", "--include_path", str(trained / "tasks")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: " in err and "not a megalite checkpoint" in err, err[-2000:]


def test_the_harness_own_command_line_runs_the_megalite_model(trained):
    """`python -m megalite.eval_harness` is the harness's own CLI (lm_eval's cli_evaluate) with the model
    registered; it ran at TP2 in the launch above. The entry point is what lm-eval releases after 0.4.13 load for a
    bare `lm_eval --model megalite`."""
    from importlib.metadata import entry_points

    from megalite import eval_harness as H

    (result_file,) = (trained / "harness-cli").rglob("results_*.json")
    result = json.loads(result_file.read_text())
    tp2 = json.loads((trained / "gpt-tp2.json").read_text())["samples"]["megalite_mc"]
    assert result["results"]["megalite_mc"]["acc,none"] == pytest.approx(sum(s["acc"] for s in tp2 if s["doc_id"] < 4) / 4)
    assert result["config"]["model"] == "megalite" and result["config"]["processes"] == 2
    assert result["n-samples"]["megalite_mc"]["effective"] == 4
    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "megalite"]
    assert ep.load() is H.model_class()


def test_lm_eval_stays_optional(trained):
    """Without lm_eval: `import megalite` and the CLI still work, and --tasks names the extra to install."""
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import megalite, megalite.cli, megalite.eval_harness\n"
            "assert not any(m.startswith('lm_eval') and sys.modules[m] for m in sys.modules)\n"
            f"sys.exit(megalite.cli.main(['eval', '--checkpoint', {str(trained / 'gpt')!r}, '--tasks', 'x']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "megalite[eval]" in done.stderr, done.stderr[-2000:]


def test_train_eval_tasks_config_is_validated():
    from megalite.errors import ConfigError

    raw = tiny_config("data", "out", train={"eval_tasks": {"tasks": ["hellaswag"], "limt": 5}})
    with pytest.raises(ConfigError, match=r"train\.eval_tasks\.limt: unknown key \(did you mean 'limit'\?\)"):
        C.from_dict(raw)
    raw = tiny_config("data", "out", train={"eval_tasks": {"tasks": [], "limit": 0}}, parallel={"pipeline": 2},
                      deepspeed={"zero_optimization": {"stage": 1}})
    with pytest.raises(ConfigError) as e:
        C.from_dict(raw)
    text = str(e.value)
    for expected in ("train.eval_tasks.tasks: give at least one", "train.eval_tasks.limit: must be > 0, got 0",
                     "train.eval_tasks: not available with parallel.pipeline=2"):
        assert expected in text, text
    raw = tiny_config("data", "out", train={"eval_tasks": {"tasks": ["hellaswag"], "num_fewshot": -1}},
                      parallel={"tensor": 2, "sequence_parallel": True})
    with pytest.raises(ConfigError) as e:
        C.from_dict(raw)
    text = str(e.value)
    for expected in ("train.eval_tasks.num_fewshot: must be >= 0, got -1",
                     "train.eval_tasks: not available with parallel.sequence_parallel at parallel.tensor=2"):
        assert expected in text, text
    raw = tiny_config("data", "out", train={"eval_tasks": {"tasks": ["hellaswag"]}}, parallel={"context": 2})
    with pytest.raises(ConfigError, match=r"train\.eval_tasks: not available with parallel\.context=2 .*megalite eval "
                                          r"--tasks"):
        C.from_dict(raw)
    C.from_dict(tiny_config("data", "out", train={"eval_tasks": {"tasks": ["hellaswag"], "limit": 5}},
                            parallel={"tensor": 2}))  # a valid one
