"""`megalite eval --tasks` on input a new user gives it, and what the harness hands megalite's model.

One launch (one process) prepares a small corpus of random words and trains a tiny model on it (150 steps: its
generations are words, so stop sequences are met); the checks run in this process on its
checkpoint, with task YAMLs over local JSON Lines files:
- bad numbers, an --output that cannot take a file and more few-shot examples than a task has are refused before
  the model loads (the checkpoint given is even missing), naming the flag; and finished scores are never lost when
  the result file cannot be written at the end.
- a task YAML that does not parse is named with its line (PyYAML's own report is the reference), and a task whose
  definition is invalid is reported as such, with its file, not as a problem with the offline data cache.
- the generation options a task's YAML sets (temperature, top_k, top_p, until, max_gen_toks) are the ones megalite's
  sampler is called with, and every sampled token is the one an independent float64 temperature/top-k/top-p
  sampler draws from the same logits with the same generator state.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="the `eval` extra (lm-eval) is not installed")

from tests.helpers.distributed import run_ranks  # noqa: E402
from tests.helpers.engine_utils import tiny_config  # noqa: E402

WORDS = ["cat", "dog", "sees", "the", "red", "bird", "likes", "small", "river", "stone"]


def _train(root: str) -> None:
    from megalite import config as C
    from megalite.engine.trainer import Trainer

    raw = tiny_config(f"{root}/data/corpus", f"{root}/run", data={"seq_length": 32},
                      train={"steps": 150, "checkpoint_interval": 150, "log_interval": 150})
    raw["model"].update(vocab_size=300, max_position_embeddings=64)
    if Trainer(C.from_dict(raw)).train() != 0:
        raise RuntimeError("training failed")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _task(folder: Path, name: str, body: str, test: str = "mc_test.jsonl", train: str | None = "mc_train.jsonl") -> Path:
    files = f"    test: {folder / test}\n" + (f"    train: {folder / train}\n" if train else "")
    path = folder / f"{name}.yaml"
    path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{files}test_split: test\n"
                    f"{body}metadata:\n  version: 1.0\n")
    return path


MC = ("output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
      "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from megalite.data.prepare import prepare

    root = tmp_path_factory.mktemp("harness_inputs")
    rng = random.Random(0)
    _jsonl(root / "corpus.jsonl", [{"text": " ".join(rng.choice(WORDS) for _ in range(30))} for _ in range(200)])
    prepare([str(root / "corpus.jsonl")], str(root / "data" / "corpus"), vocab_size=300, progress=False)
    run_ranks(_train, 1, str(root), timeout_s=300, collective_timeout_s=60)
    tasks = root / "tasks"
    tasks.mkdir()
    questions = [{"question": f"the {word}", "choices": [" sees", " dog", " river"], "answer": rng.randrange(3)}
                 for word in WORDS[:5]]
    _jsonl(tasks / "mc_test.jsonl", questions)
    _jsonl(tasks / "mc_train.jsonl", questions[:3])  # three few-shot examples
    _jsonl(tasks / "mc_dup.jsonl", questions[:4] + questions[:1])  # the first twice
    _task(tasks, "tiny_mc", "fewshot_split: train\n" + MC)
    _task(tasks, "tiny_mc_self", "fewshot_split: test\n" + MC, train=None)  # few-shot from the evaluated split
    _task(tasks, "tiny_mc_dup", "fewshot_split: test\n" + MC, test="mc_dup.jsonl", train=None)
    _task(tasks, "tiny_mc_five", "fewshot_split: train\nnum_fewshot: 5\n" + MC)  # its own default asks too many
    prompts = ["the cat sees", "the red bird likes the small", "a dog", "the river likes", "stone sees the red dog"]
    _jsonl(tasks / "gen_test.jsonl", [{"prompt": p, "target": " dog"} for p in prompts])
    generate = ("output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
                "metric_list:\n  - metric: exact_match\n")
    for name, options in GENERATION_TASKS.items():
        _task(tasks, name, generate.replace("metric_list", f"generation_kwargs:\n{options}metric_list"),
              test="gen_test.jsonl", train=None)
    broken = tmp_path_factory.mktemp("broken_tasks")
    _write_broken_tasks(broken, tasks)
    return root


def _eval(capsys: pytest.CaptureFixture, checkpoint: Path, tasks_dir: Path, *args: str) -> tuple[int, str, str]:
    import logging
    import sys

    from megalite.cli import main

    # lm_eval, datasets, torch and DeepSpeed log through handlers made with the stderr of the test that first ran the
    # CLI in this process, which capsys closes afterwards: point them at this test's (else a logging traceback)
    for logger in [logging.root, *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # not setStream: it would flush the closed one
    code = main(["eval", "--checkpoint", str(checkpoint), "--include-path", str(tasks_dir), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- refused before the model loads


@pytest.mark.parametrize(("args", "named"), [
    (("--limit", "inf"), "--limit inf: must be a whole number of examples, or a fraction below 1"),
    (("--limit", "2.5"), "--limit 2.5: must be a whole number of examples"),
    (("--limit", "nan"), "--limit nan: must be > 0"),
    (("--output", "{tasks}"), "--output {tasks}: is a directory; give a file name"),
    (("--output", "{tasks}/"), "is a directory"),
    (("--output", "{tasks}/mc_test.jsonl/result.json"), "{tasks}/mc_test.jsonl is a file, not a folder"),
])
def test_bad_options_are_refused_before_loading(workdir, capsys, args, named) -> None:
    """The checkpoint does not exist: an error about it would mean the options were checked too late."""
    tasks = str(workdir / "tasks")
    args = tuple(a.format(tasks=tasks) for a in args)
    code, out, err = _eval(capsys, workdir / "nowhere", workdir / "tasks", "--tasks", "tiny_mc", *args)
    assert code == 2 and "megalite eval: error: " in err and named.format(tasks=tasks) in err and not out, err
    assert "Traceback" not in err and "nowhere" not in err


@pytest.mark.parametrize(("task", "shots", "named"), [
    ("tiny_mc", "4", "--num-fewshot 4: task 'tiny_mc' has 3 few-shot example(s) in its 'train' split; use at most 3"),
    ("tiny_mc_self", "5", "--num-fewshot 5: task 'tiny_mc_self' has 4 few-shot example(s) in its 'test' split (a "
                          "document and its copies are not examples for it); use at most 4"),
    ("tiny_mc_dup", "4", "--num-fewshot 4: task 'tiny_mc_dup' has 3 few-shot example(s)"),
    ("tiny_mc_five", None, "its own num_fewshot 5: task 'tiny_mc_five' has 3 few-shot example(s)"),
])
def test_more_fewshot_examples_than_the_task_has(workdir, capsys, task, shots, named) -> None:
    """The harness crashed with `ValueError: Sample larger than population` on the first request, after loading the
    model; now the task's few-shot pool is counted first."""
    args = ("--tasks", task) + (("--num-fewshot", shots) if shots else ())
    code, out, err = _eval(capsys, workdir / "nowhere", workdir / "tasks", *args)
    assert code == 2 and f"megalite eval: error: {named}" in err and not out, err
    assert "Traceback" not in err and "nowhere" not in err


def test_the_largest_fewshot_counts_run(workdir, capsys) -> None:
    """The bounds are the real ones: 3 from the 3-document train split, 4 from the 5-document test split, 3 from
    a test split of 5 documents, one of them twice."""
    for task, shots in (("tiny_mc", "3"), ("tiny_mc_self", "4"), ("tiny_mc_dup", "3")):
        code, out, err = _eval(capsys, workdir / "run", workdir / "tasks", "--tasks", task, "--num-fewshot", shots,
                               "--json")
        assert code == 0, err[-3000:]
        assert json.loads(out)["n-shot"] == {task: int(shots)}


# ----------------------------------------------------------------------------- finished scores are never lost


def test_scores_survive_an_output_that_fails_at_the_end(workdir, capsys, monkeypatch, tmp_path) -> None:
    """The output was fine when checked, then a directory took its name during the evaluation: the scores are
    printed, written next to it, and the error (exit 2) says where."""
    import megalite.eval_harness as H

    output = tmp_path / "out" / "result.json"
    real = H.evaluate_checkpoint_tasks

    def evaluate_then_block(*args, **kwargs):
        done = real(*args, **kwargs)
        output.mkdir(parents=True)  # what the user asked for can no longer be a file
        return done

    monkeypatch.setattr(H, "evaluate_checkpoint_tasks", evaluate_then_block)
    code, out, err = _eval(capsys, workdir / "run", workdir / "tasks", "--tasks", "tiny_mc", "--limit", "3",
                           "--json", "--output", str(output))
    assert code == 2, err[-3000:]
    printed = json.loads(out)
    (saved,) = (tmp_path / "out").glob("result.json.unsaved-*.json")
    assert f"megalite eval: error: --output {output}: could not be written (IsADirectoryError" in err, err[-2000:]
    assert f"the results were written to {saved} instead" in err
    assert json.loads(saved.read_text())["results"] == printed["results"] and printed["results"]["tiny_mc"]


def test_scores_go_to_stderr_when_nothing_can_be_written(workdir, capsys, monkeypatch, tmp_path) -> None:
    import megalite.eval_harness.results as R

    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(R, "atomic_write_text", full_disk)
    code, out, err = _eval(capsys, workdir / "run", workdir / "tasks", "--tasks", "tiny_mc", "--limit", "2",
                           "--output", str(tmp_path / "result.json"))
    assert code == 2 and out.startswith("|"), err[-2000:]  # the table was printed
    assert "could not be written (OSError: No space left on device), nor anywhere else" in err
    start = err.index('{\n  "checkpoint"')
    document = json.loads(err[start:err.index("\n}\n", start) + 2])
    assert document["results"]["tiny_mc"]["acc,none"] >= 0


# ----------------------------------------------------------------------------- task definitions that do not load


BROKEN_SYNTAX = MC.replace('doc_to_text: "{{question}}"', 'doc_to_text: "{{question}}\n  extra: [unclosed')


def _write_broken_tasks(folder: Path, data: Path) -> None:
    """Task files with one mistake each, in their own include path, over the good tasks' data."""
    def task(name: str, body: str, test: str = "mc_test.jsonl") -> None:
        _task(folder, name, "fewshot_split: train\n" + body, test=test)
        text = (folder / f"{name}.yaml").read_text().replace(str(folder), str(data))
        (folder / f"{name}.yaml").write_text(text)

    task("bad_syntax", BROKEN_SYNTAX)
    task("bad_template", MC.replace('doc_to_text: "{{question}}"', 'doc_to_text: "{{question}"'))
    task("bad_metric", MC.replace("metric: acc", "metric: accuracy_of_doom"))
    task("bad_output_type", MC.replace("output_type: multiple_choice", "output_type: multiple_chose"))
    task("bad_function", MC.replace('doc_to_text: "{{question}}"', "doc_to_text: !function helpers.missing"))
    task("missing_file", MC, test="no_such_file.jsonl")


def test_a_yaml_syntax_error_is_named_with_its_line(workdir, capsys) -> None:
    """The harness's index skipped the file, and megalite said "unknown task"."""
    import yaml

    broken = next(workdir.parent.glob("broken_tasks*"))
    path = broken / "bad_syntax.yaml"
    with pytest.raises(yaml.MarkedYAMLError) as parsed:  # the reference: PyYAML's own report
        yaml.safe_load(path.read_text())
    mark = parsed.value.problem_mark
    # with a misspelt name, which is still unknown, and lists the files that could not be read
    code, out, err = _eval(capsys, workdir / "nowhere", broken, "--tasks", "bad_syntax,bad_metrik")
    assert code == 2 and not out and "Traceback" not in err, err
    assert (f"--tasks: task 'bad_syntax' is defined in {path}, which cannot be read: line {mark.line + 1}, column "
            f"{mark.column + 1}: ") in err, err  # the parser's own words follow
    assert "unknown task 'bad_syntax'" not in err
    assert "unknown task 'bad_metrik'; close names: bad_metric" in err, err
    assert f"task files in the include path that cannot be read: {path}: line {mark.line + 1}" in err


@pytest.mark.parametrize(("task", "cause"), [
    ("bad_template", "its definition is invalid in doc_to_text (line 10): TemplateSyntaxError: unexpected '}'"),
    ("bad_metric", "the harness said before: Could not find registered metric 'accuracy_of_doom'"),
    ("bad_output_type", "its definition is invalid: ValueError: Got invalid output_type 'multiple_chose'"),
    ("bad_function", "its definition is invalid: ImportError: Cannot import module 'helpers' for function 'missing'"),
])
def test_a_task_definition_error_is_not_blamed_on_the_data(workdir, capsys, task, cause) -> None:
    """These were "its data could not be loaded" with advice about the offline datasets cache."""
    broken = next(workdir.parent.glob("broken_tasks*"))
    code, out, err = _eval(capsys, workdir / "nowhere", broken, "--tasks", task)
    assert code == 2 and not out and "Traceback" not in err, err
    assert f"megalite eval: error: task {task!r} ({broken / (task + '.yaml')}): " in err and cause in err, err
    assert "data could not be loaded" not in err and "HF_DATASETS_CACHE" not in err


def test_a_missing_data_file_is_still_a_data_error(workdir, capsys) -> None:
    broken = next(workdir.parent.glob("broken_tasks*"))
    code, out, err = _eval(capsys, workdir / "nowhere", broken, "--tasks", "missing_file")
    assert code == 2 and not out, err
    assert (f"task 'missing_file' ({broken / 'missing_file.yaml'}): its data could not be loaded "
            "(FileNotFoundError: ") in err and "no_such_file.jsonl" in err, err
    assert "Check the files its dataset_kwargs.data_files names" in err and "HF_DATASETS_CACHE" not in err


# ----------------------------------------------------------------------------- generation options the harness passes


GENERATION_TASKS = {  # task -> its YAML's generation_kwargs
    "tiny_sampled": "  until: [\"bird\", \"likes\"]\n  do_sample: true\n  temperature: 0.7\n  top_k: 5\n  top_p: 0.8\n"
                    "  max_gen_toks: 6\n",
    "tiny_greedy": "  until: [\"cat\"]\n  do_sample: false\n  temperature: 0.9\n  max_gen_toks: 4\n",  # greedy wins
    "tiny_default_temperature": "  do_sample: true\n  top_p: 0.5\n  max_gen_toks: 3\n",  # temperature 1, as HF
    "tiny_zero_temperature": "  do_sample: true\n  temperature: 0\n  max_gen_toks: 3\n",  # greedy, not 1.0
}
# What each task asks of the sampler: (temperature, top_k, top_p, max_new_tokens, the task's stop sequences; without
# `until` the harness stops at its few-shot delimiter, "\n\n")
ASKED = {"tiny_sampled": (0.7, 5, 0.8, 6, ["bird", "likes"]), "tiny_greedy": (0.0, None, None, 4, ["cat"]),
         "tiny_default_temperature": (1.0, None, 0.5, 3, ["\n\n"]),
         "tiny_zero_temperature": (0.0, None, None, 3, ["\n\n"])}


def reference_probabilities(logits, temperature: float, top_k, top_p):
    """Temperature, then top-k (ties with the k-th kept), then top-p (the smallest set of the most likely tokens whose
    mass reaches p, the most likely always kept), renormalised: in float64, row by row, written from the definition
    (Holtzman et al. 2020 for top-p), not from megalite's code."""
    import numpy as np
    import torch

    out = []
    for row in logits.double().numpy():
        z = row / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if top_k:
            kth = np.sort(p)[::-1][min(top_k, len(p)) - 1]
            p = np.where(p >= kth, p, 0.0)
            p /= p.sum()
        if top_p is not None and top_p < 1.0:
            keep = np.zeros(len(p), dtype=bool)
            mass = 0.0
            for i in np.argsort(-p, kind="stable"):
                if mass >= top_p and keep.any():
                    break
                keep[i] = p[i] > 0
                mass += p[i]
            p = np.where(keep, p, 0.0)
            p /= p.sum()
        out.append(p)
    return torch.tensor(np.array(out))


@pytest.mark.parametrize("task", list(GENERATION_TASKS))
def test_generation_options_reach_the_sampler_as_the_task_asks(workdir, monkeypatch, task) -> None:
    import torch

    from megalite import eval_harness as H
    from megalite.eval_harness.calls import ModelCalls
    from megalite.generate import load_for_inference
    from megalite.model import sampling

    draws, calls = [], []
    real_sample, real_generate = sampling.sample_next, ModelCalls.generate

    def recording_sample(logits, temperature, top_k, top_p, generator):
        state = generator.get_state().clone()
        tokens = real_sample(logits, temperature, top_k, top_p, generator)
        draws.append((logits.detach().clone(), temperature, top_k, top_p, state, tokens.clone()))
        return tokens

    def recording_generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, until):
        out = real_generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, until)
        calls.append({"prompts": prompts, "max_new_tokens": max_new_tokens, "until": list(until), "out": out})
        return out

    monkeypatch.setattr(sampling, "sample_next", recording_sample)
    monkeypatch.setattr(ModelCalls, "generate", recording_generate)
    loaded = load_for_inference(workdir / "run")
    lm = H.model_class().for_model(loaded.model, loaded.tokenizer, loaded.eod_token_id, loaded.bos_token_id,
                                   batch_size=4, step_dir=loaded.step_dir)
    manager, names = H.find_tasks([task], str(workdir / "tasks"))
    result = H.run_tasks(lm, manager, names, log_samples=True, bootstrap_iters=0)

    temperature, top_k, top_p, max_new, stops = ASKED[task]
    eos = loaded.tokenizer.decode([loaded.eod_token_id], skip_special_tokens=False)
    assert calls and draws
    for call in calls:  # until: the task's stop sequences and the end of text (the harness's own rule)
        assert call["max_new_tokens"] == max_new and call["until"] == stops + [eos], call
    assert {(t, k, p) for _, t, k, p, _, _ in draws} == {(temperature, top_k, top_p)}
    for logits, t, k, p, state, tokens in draws:
        if temperature == 0:
            expected = logits.argmax(dim=-1)  # greedy
        else:
            ours = sampling.sampling_probabilities(logits, t, k, p).double()
            ref = reference_probabilities(logits, temperature, top_k, top_p)
            torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
            expected = torch.multinomial(ref.float(), 1, generator=torch.Generator().set_state(state)).squeeze(-1)
        assert torch.equal(tokens, expected), (tokens, expected)

    # Each response is the sampled tokens' text cut at the first stop sequence; a generation shorter than
    # max_gen_toks stopped at a stop sequence or the end of text.
    expected_texts = []
    for call in calls:
        for row in call["out"]:
            assert len(row) <= max_new
            text = loaded.tokenizer.decode(row[: row.index(loaded.eod_token_id)] if loaded.eod_token_id in row
                                           else row, skip_special_tokens=True)
            if len(row) < max_new:
                assert loaded.eod_token_id in row or any(s in text for s in stops), (row, text)
            for stop in stops:
                text = text.split(stop)[0]
            expected_texts.append(text)
    responses = [s["resps"][0][0] for s in result["samples"][task]]
    assert sorted(responses) == sorted(expected_texts) and len(responses) == 5
    lengths = [len(row) for call in calls for row in call["out"]]
    if stops != ["\n\n"]:  # the model writes words: some generations meet a stop sequence, some run to the end
        assert min(lengths) < max_new == max(lengths), lengths
