"""meteora.data: JSONL tasks, BIG-bench conversion (fixture of real task.json excerpts, and the real
data when it is in the cache), composite-n."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meteora import data

FIXTURE = Path(__file__).parent / "data" / "bigbench"


def write(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_jsonl_reports_file_and_line(tmp_path):
    good = {"prompt": "p", "response": "r"}
    f = write(tmp_path / "t.jsonl", [good, "", good])
    assert data.read_jsonl(f) == [good, good]  # blank lines are skipped
    cases = [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"prompt": "p"}', "field 'response' is missing"),
        ('{"prompt": "p", "response": 3}', "field 'response' is a int, not a string"),
    ]
    for bad, why in cases:
        f = write(tmp_path / "bad.jsonl", [good, good, bad])
        with pytest.raises(data.DataError, match=rf"bad\.jsonl:3: {why}"):
            data.read_jsonl(f)


def test_write_jsonl_round_trip_leaves_no_temp_files(tmp_path):
    rows = [{"prompt": "ü\n", "response": "x", "extra": [1]}] * 3
    path = data.write_jsonl(tmp_path / "sub" / "rows.jsonl", rows)
    assert data.read_jsonl(path) == rows
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.jsonl"]


def test_split_rows_is_seeded_and_takes_a_fifth():
    rows = [{"i": i} for i in range(101)]
    train, test = data.split_rows(rows)
    assert (len(train), len(test)) == (81, 20)
    assert sorted(r["i"] for r in train + test) == list(range(101))
    assert data.split_rows(rows) == (train, test)
    assert data.split_rows(rows, seed=1) != (train, test)
    assert data.split_rows([{"i": 0}]) == ([{"i": 0}], [])


def test_local_tasks_folder_file_and_data_dir(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    write(tmp_path / "folder" / "train.jsonl", rows[:7])
    write(tmp_path / "folder" / "test.jsonl", rows[7:])
    task = data.load_task(f"mine={tmp_path / 'folder'}")
    assert (task.name, len(task.train), len(task.test)) == ("mine", 7, 3)
    write(tmp_path / "lib" / "single.jsonl", rows)
    task = data.load_task("single", data_dir=tmp_path / "lib")
    assert (task.name, len(task.train), len(task.test)) == ("single", 8, 2)
    task = data.load_task(str(tmp_path / "lib" / "single.jsonl"))
    assert task.name == "single"
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match=r"empty/train\.jsonl not found"):
        data.load_task(f"e={tmp_path / 'empty'}")
    with pytest.raises(data.DataError, match="'no_such_task' is not a path"):
        data.load_task("no_such_task")
    (tmp_path / "lib" / "mine").mkdir()
    write(tmp_path / "lib" / "mine" / "train.jsonl", [{"prompt": "m", "response": "m"}] * 3)
    mixed = data.load_task("mix=mine+single", data_dir=tmp_path / "lib")
    assert mixed.name == "mix" and len(mixed.train) == 2 + 8  # mine: 3 rows, one of them test
    assert [r["prompt"] for r in mixed.train[:4]] == ["m", task.train[0]["prompt"], "m", task.train[1]["prompt"]]
    long_union = "+".join(["single"] * 40)  # longer than a file name may be
    assert len(data.load_task(f"many={long_union}", data_dir=tmp_path / "lib").train) == 40 * 8
    with pytest.raises(data.DataError, match="task names repeat"):
        data.load_tasks([f"a={tmp_path / 'folder'}", f"a={tmp_path / 'lib' / 'single.jsonl'}"])


@pytest.mark.parametrize("name", data.BIGBENCH_TASKS)
def test_bigbench_conversion_on_real_excerpts(name):
    """Every offline BIG-bench task of TASKS.md converts (fixture: the first examples of the real files)."""
    files = [FIXTURE / name / "task.json"] + sorted((FIXTURE / name).glob("*/task.json"))
    expected = sum(len(json.loads(f.read_text()).get("examples", [])) for f in files)
    task = data.convert_bigbench_task(name, FIXTURE)
    rows = task.train + task.test
    assert len(rows) == expected > 0
    assert all(r["prompt"] and r["response"] and r["prompt"] == r["prompt"].strip() for r in rows)
    assert task.source == f"bigbench:{name}" and task.metric == data.TASK_METRICS[name]
    has_choices = any("\nchoice: " in r["prompt"] for r in rows)
    assert has_choices == (name in data.APPEND_CHOICES)


def test_bigbench_conversion_rules():
    spec = json.loads((FIXTURE / "object_counting" / "task.json").read_text())
    rows = data.convert_bigbench_task("object_counting", FIXTURE)
    first = spec["examples"][0]
    row = next(r for r in rows.train + rows.test if first["input"] in r["prompt"])
    assert row == {"prompt": f"Q: {first['input']}\nA:", "response": first["target"][0]}  # default prefixes
    # target_scores: the highest-scored choice; task_prefix and the task's own prefixes
    spec = json.loads((FIXTURE / "winowhy" / "task.json").read_text())
    example = spec["examples"][0]
    rows = data.convert_bigbench_task("winowhy", FIXTURE)
    row = next(r for r in rows.train + rows.test if example["input"] in r["prompt"])
    best = max(example["target_scores"], key=example["target_scores"].get)
    assert row["response"] == best and row["prompt"].startswith(spec["task_prefix"].strip())
    assert row["prompt"].endswith(spec["example_output_prefix"].strip())
    # a "target" string wins over target_scores (strategyqa's explanations)
    spec = json.loads((FIXTURE / "strategyqa" / "task.json").read_text())
    rows = data.convert_bigbench_task("strategyqa", FIXTURE)
    assert {r["response"] for r in rows.train + rows.test} == {e["target"].strip() for e in spec["examples"]}
    # subtasks are merged, choices appended in order
    rows = data.convert_bigbench_task("logical_deduction", FIXTURE)
    subtasks = sorted(p.parent.name for p in (FIXTURE / "logical_deduction").glob("*/task.json"))
    assert len(subtasks) == 3 and len(rows.train + rows.test) == 9
    row = rows.train[0]
    choices = [line[len("choice: "):] for line in row["prompt"].splitlines() if line.startswith("choice: ")]
    assert row["response"] in choices and len(choices) >= 3


def test_bigbench_errors_name_the_file(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "task.json").write_text('{"examples": [{"input": "x"}]}')
    with pytest.raises(data.DataError, match=r"t/task\.json examples\[0\]: example has neither"):
        data.convert_bigbench_task("t", tmp_path)
    (tmp_path / "t" / "task.json").write_text("{oops")
    with pytest.raises(data.DataError, match=r"t/task\.json: not valid JSON"):
        data.convert_bigbench_task("t", tmp_path)
    with pytest.raises(data.DataError, match="not found"):
        data.convert_bigbench_task("absent", tmp_path)


def _real_bigbench_available() -> bool:
    root = data.bigbench_dir() / "benchmark_tasks"
    return all((root / t / "task.json").is_file() for t in data.BIGBENCH_TASKS) or \
        (data.bigbench_dir() / f"bigbench-{data.BIGBENCH_VERSION}.tar.gz").is_file()


@pytest.mark.skipif(not _real_bigbench_available(),
                    reason="BIG-bench data not in the cache (python -m meteora.train fetches it); fixture tests cover it")
@pytest.mark.parametrize("name", data.BIGBENCH_TASKS)
def test_bigbench_conversion_on_real_data(name, monkeypatch):
    task = data.convert_bigbench_task(name, data.bigbench_tasks_dir([name], download=False))
    assert len(task.train) >= 600 and len(task.test) >= 150
    assert abs(len(task.test) / (len(task.train) + len(task.test)) - 0.2) < 0.01
    assert all(isinstance(r["response"], str) and r["response"] for r in task.train[:500])


def _fixture_tasks(names):
    tasks = []
    for name in names:
        rows = [{"prompt": f"{name} question {i}", "response": f"{name} answer {i}\nline two"} for i in range(10)]
        train, test = data.split_rows(rows)
        tasks.append(data.Task(name, train, test))
    return tasks


def test_composite_rows_and_answer_split():
    tasks = _fixture_tasks(["t1", "t2", "t3"])
    rows = data.build_composite(tasks, samples=5)
    assert rows == data.build_composite(tasks, samples=5)  # seed 47: the same every time
    assert rows != data.build_composite(tasks, samples=5, seed=1)
    prefixes = {r["prompt"].rsplit("Questions:", 1)[0] for r in rows}
    assert len(prefixes) == 1 and prefixes.pop().count("Answers:") == 2  # one fixed 2-shot prefix
    for row in rows:
        assert row["tasks"] == ["t1", "t2", "t3"]
        assert row["prompt"].endswith("Answers:")
        for i, (task, answer) in enumerate(zip(tasks, row["answers"]), 1):
            assert f"\n{i}. {task.name} question" in row["prompt"] and answer in [r["response"] for r in task.test]
        assert data.split_composite_answer(row["response"], 3) == [" ".join(a.split()) for a in row["answers"]]
    assert data.split_composite_answer("1) x\nnoise\n3. z\n1. again", 3) == ["x", "", "z"]
    assert data.composite_task_names(10)[7:9] == ["language_identification", "topical_chat"]
    assert data.composite_task_names(10, offline=False)[7] == "news_commentary_de"
    with pytest.raises(ValueError, match="n must be one of"):
        data.composite_task_names(4)


def test_atomic_folder_replaces_keeps_a_whole_one_and_cleans_up(tmp_path):
    from meteora._files import atomic_folder

    target = tmp_path / "model"
    atomic_folder(target, lambda d: (d / "a").write_text("1"))
    atomic_folder(target, lambda d: (d / "a").write_text("2"))  # replaced
    assert (target / "a").read_text() == "2"
    atomic_folder(target, lambda d: (d / "a").write_text("3"), complete=lambda t: (t / "a").is_file())
    assert (target / "a").read_text() == "2"  # another process's whole folder is kept

    def fail(d):
        (d / "a").write_text("4")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_folder(target, fail)
    assert (target / "a").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    # Another process's folder appears just after this one looked (its first check says "not
    # whole"): that folder stays (the other process may be reading it) and this copy is dropped.
    target.rename(tmp_path / "old")
    calls = []

    def racing(t):
        calls.append(t)
        if len(calls) == 1:
            t.mkdir()
            (t / "a").write_text("6")
            return False
        return (t / "a").is_file()

    atomic_folder(target, lambda d: (d / "a").write_text("5"), complete=racing)
    assert (target / "a").read_text() == "6"
    whole = lambda t: (t / "a").is_file()  # noqa: E731
    # A broken leftover (no "a") is replaced.
    (target / "a").unlink()
    (target / "b").write_text("x")
    atomic_folder(target, lambda d: (d / "a").write_text("7"), complete=whole)
    assert sorted(p.name for p in target.iterdir()) == ["a"] and (target / "a").read_text() == "7"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "old"]
