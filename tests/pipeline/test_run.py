"""`mhsft run exp.yaml`: the file's checks, skipping finished stages, resume after a kill during sft, and the
whole demo pipeline (data, sft, export, base and fine-tuned eval with a judge served by `mhsft deploy`, report)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import REPO
from mhsft.pipeline import run as pipeline
from mhsft.pipeline.plan import load_experiment, plan, to_argv
from mhsft.utils import UserError

DATA = REPO / "examples" / "data"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text.replace("DATA", str(DATA)), encoding="utf-8")
    return path


def run(exp: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mhsft", "run", str(exp), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


# ----------------------------------------------------------------------------------------------- the file
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: builtin:tiny\nsft: {max_step: 3, dataset: x.jsonl}\n", "unknown setting 'max_step'"),
        (
            "model: builtin:tiny\nsft: {output_dir: o, dataset: x.jsonl}\n",
            "output_dir is decided by the pipeline",
        ),
        (
            "model: builtin:tiny\nsft: {max_steps: many, dataset: x.jsonl}\n",
            "a value the stage does not accept",
        ),
        ("model: builtin:tiny\ntrain: {}\n", "unknown key(s) train"),
        ("model: builtin:tiny\nsft: [1, 2]\n", "sft: expected a mapping"),
        ("sft: {dataset: x.jsonl}\n", "give model"),
        ("model: builtin:tiny\nexport: {}\n", "add an sft section"),
        (
            "model: builtin:tiny\neval: {eval_dataset: [a.jsonl], judge_deploy: {port: 1, model: m}}\n",
            "port is decided",
        ),
        ("model: builtin:tiny\nsft: {dataset: x.jsonl\n", "not valid YAML"),
    ],
)
def test_bad_experiment_files_are_one_line_errors(tmp_path, text, message):
    exp = write_yaml(tmp_path / "exp.yaml", text)
    with pytest.raises(UserError) as e:
        plan(load_experiment(exp))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_flags_env_and_aliases(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_LR", "0.002")
    monkeypatch.delenv("UNSET_KEY_FOR_TEST", raising=False)
    exp = write_yaml(
        tmp_path / "exp.yaml",
        "exp_dir: out\nmodel: builtin:tiny\nsft:\n  dataset: [DATA/demo_sharegpt.jsonl]\n"
        "  tuner_type: lora\n  learning_rate: ${MY_LR}\n  swanlab_token: ${UNSET_KEY_FOR_TEST}\n"
        "  swanlab_project: ${UNSET_PROJECT:-mh-sft}\n  packing: true\n  target_modules: [q_proj, v_proj]\n",
    )
    (st,) = plan(load_experiment(exp))
    argv = to_argv(st.flags)
    assert argv[argv.index("--learning_rate") + 1] == "0.002"
    assert argv[argv.index("--train_type") + 1] == "lora"  # ms-swift 4's name, renamed
    assert "--swanlab_token" not in argv  # an unset variable leaves the flag out (the stage reads the env)
    assert argv[argv.index("--swanlab_project") + 1] == "mh-sft"
    assert argv[argv.index("--target_modules") + 1 : argv.index("--target_modules") + 3] == [
        "q_proj",
        "v_proj",
    ]
    assert argv[argv.index("--packing") + 1] == "true"


def test_demo_dry_run_prints_every_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the demo's paths are relative to the repository
    text = (REPO / "examples" / "demo.yaml").read_text(encoding="utf-8")
    exp = tmp_path / "demo.yaml"
    exp.write_text(re.sub(r"(?m)^exp_dir: .*$", f"exp_dir: {tmp_path / 'exp'}", text), encoding="utf-8")
    assert pipeline.main([str(exp), "--dry_run"]) == 0
    assert not (tmp_path / "exp").exists()  # a dry run writes nothing
    out = capsys.readouterr().out
    names = re.findall(r"== \[\d/7\] (\w+)", out)
    assert names == ["data", "sft", "export", "eval_base", "eval_finetuned", "review", "report"]
    assert re.search(
        r"mhsft review create --runs \S+/eval/base \S+/eval/finetuned --raters a,b --sample 6 --overlap 2",
        out,
    )
    assert "--review EXP/review" in out
    assert "mhsft data clean --dataset examples/data/demo_sharegpt.jsonl" in out
    assert "--resume_from_checkpoint auto" in out and "--judge_api_url http://127.0.0.1:PORT/v1" in out
    assert "--baseline" in out
    # base and fine-tuned in one `mhsft eval`: the adapter beside the base model, one load
    assert "eval_finetuned: evaluate the fine-tuned model (adapter): with eval_base, in one load" in out
    (line,) = [ln for ln in out.splitlines() if "would run: mhsft eval" in ln]
    assert "--model builtin:tiny --adapters finetuned=EXP/sft/vN-.../checkpoint-N" in line
    assert line.endswith(f"--output_dir {tmp_path / 'exp' / 'eval'} --judge_api_url http://127.0.0.1:PORT/v1")
    # `finetuned: merged` evaluates the merged model, in an `mhsft eval` of its own
    exp.write_text(exp.read_text().replace("  max_turns: 2\n", "  max_turns: 2\n  finetuned: merged\n"))
    assert pipeline.main([str(exp), "--dry_run"]) == 0
    evals = [ln for ln in capsys.readouterr().out.splitlines() if "would run: mhsft eval" in ln]
    assert len(evals) == 2 and "--model EXP/export/merged" in evals[1]


def test_exp_dir_on_the_command_line_overrides_the_file(tmp_path, capsys, monkeypatch):
    """One experiment file run into two folders: `--exp_dir` replaces the file's exp_dir for every stage."""
    monkeypatch.chdir(tmp_path)
    exp = write_yaml(
        tmp_path / "exp.yaml", "exp_dir: from_file\ndata: {dataset: [DATA/demo_sharegpt.jsonl]}\n"
    )
    assert pipeline.main([str(exp), "--exp_dir", "a", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert f"-> {tmp_path / 'a'}" in out and f"--output {tmp_path / 'a' / 'data'}" in out
    assert "from_file" not in out
    assert pipeline.main([str(exp), "--exp_dir=a"]) == 0
    assert pipeline.main([str(exp), "--exp_dir", str(tmp_path / "b")]) == 0
    for folder in ("a", "b"):
        assert (tmp_path / folder / "data" / "clean.jsonl").is_file()
    assert not (tmp_path / "from_file").exists()
    assert pipeline.main([str(exp), "--exp_dir", "a"]) == 0  # a's state is its own: its stage is skipped
    assert "data: " in (out := capsys.readouterr().out) and "skipped (done" in out
    with pytest.raises(UserError, match="--exp_dir needs a folder"):
        pipeline.main([str(exp), "--exp_dir"])


def test_without_export_the_adapter_is_evaluated(tmp_path, capsys):
    exp = write_yaml(
        tmp_path / "exp.yaml",
        f"exp_dir: {tmp_path / 'exp'}\nmodel: builtin:tiny\nsft: {{dataset: DATA/demo_sharegpt.jsonl}}\n"
        "eval: {eval_dataset: [DATA/demo_mcq.jsonl], baseline: false}\nreport: {}\n",
    )
    assert pipeline.main([str(exp), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"== \[\d/3\] (\w+)", out) == ["sft", "eval_finetuned", "report"]
    assert "mhsft eval --model builtin:tiny --adapters EXP/sft/vN-.../checkpoint-N --eval_dataset" in out
    assert "mhsft report EXP/sft/vN-... " in out and "--baseline" not in out


def test_an_external_judge_that_is_down_is_said_at_the_start(tmp_path, caplog):
    """judge_api_url that does not answer: one warning before the first stage (not an error: it may be started
    later); a server that answers anything, even 404, is up; an evaluation already done needs no judge."""
    import http.server
    import threading

    port = pipeline.free_port()
    exp = write_yaml(
        tmp_path / "exp.yaml",
        f"exp_dir: {tmp_path / 'exp'}\nmodel: builtin:tiny\nsft: {{dataset: DATA/demo_sharegpt.jsonl}}\n"
        f"eval: {{eval_dataset: [DATA/demo_qa.jsonl], judge_api_url: 'http://127.0.0.1:{port}/v1'}}\n",
    )
    e = load_experiment(exp)
    stages, state = plan(e), pipeline.State(e.exp_dir)

    def warned() -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="mhsft"):
            pipeline.warn_if_judge_down(stages, state)
        return [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]

    said = warned()
    assert len(said) == 1, said  # eval_base and eval_finetuned share the URL: said once
    assert said[0].startswith(f"the judge at http://127.0.0.1:{port}/v1 does not answer now (")
    assert "eval_base needs it after the stages before it" in said[0]
    server = http.server.HTTPServer(("127.0.0.1", port), http.server.BaseHTTPRequestHandler)  # 501 to a GET
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert warned() == []
    finally:
        server.shutdown()
        server.server_close()
    for name in ("eval_base", "eval_finetuned"):
        state.stages[name] = {"status": "done"}
    assert warned() == []


def test_users_examples_plan(monkeypatch):
    """The users' 7B and 32B files and the local-file one parse and plan (nothing runs, nothing downloads)."""
    monkeypatch.chdir(REPO)
    for name in ("qwen2.5-7b-lora.yaml", "qwen2.5-32b-lora.yaml", "local-file.yaml"):
        stages = plan(load_experiment(REPO / "examples" / name))
        assert [s.name for s in stages][:2] in (["data", "sft"], ["sft", "export"]), name
        sft = next(s for s in stages if s.name == "sft")
        assert sft.flags["model"].startswith("Qwen/Qwen2.5-") and sft.flags["packing"] is True


# ----------------------------------------------------------------------------------------------- resume
def test_kill_during_sft_resumes_without_redoing_data(tmp_path, monkeypatch):
    N = 16  # steps: the kill comes right after the first checkpoint (step 2)
    exp = write_yaml(
        tmp_path / "exp.yaml",
        "exp_dir: exp\nmodel: builtin:tiny\n"
        "data: {dataset: [DATA/demo_sharegpt.jsonl]}\n"
        f"sft: {{max_steps: {N}, save_steps: 2, logging_steps: 2, max_length: 256, per_device_train_batch_size: 2,\n"
        "      gradient_accumulation_steps: 1, gradient_checkpointing: false, report_to: [none],\n"
        "      learning_rate: 1.0e-3}\n",
    )
    X = tmp_path / "exp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mhsft", "run", str(exp)],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list(X.glob("sft/v*/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, "mhsft run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # stopped (alive, holding its lock) so that the rest of its N steps cannot finish while this test looks
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.suspend()
    # a second `mhsft run` of the same experiment while the first runs: one line naming it, nothing written
    state_before = (X / ".mhsft" / "state.json").read_bytes()
    monkeypatch.chdir(tmp_path)  # exp_dir is relative to the working directory
    with pytest.raises(
        UserError, match=f"the experiment folder {X} is being written by pid {proc.pid} on host"
    ):
        pipeline.main([str(exp)])
    assert (X / ".mhsft" / "state.json").read_bytes() == state_before
    children = tree[1:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # the trainer dies with `mhsft run` (no orphan keeps writing checkpoints behind the rerun)
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive
    state = json.loads((X / ".mhsft" / "state.json").read_text())
    assert state["stages"]["sft"]["status"] == "running" and state["stages"]["data"]["status"] == "done"
    ckpts = sorted(int(p.name.split("-")[1]) for p in X.glob("sft/v*/checkpoint-*"))
    assert ckpts and ckpts[-1] < N, "the kill came too late to test anything"
    train_mtime = (X / "data" / "train.jsonl").stat().st_mtime_ns

    p = run(exp, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"\] data: .*skipped", p.stdout), p.stdout
    assert "sft: fine-tune (continuing the interrupted run)" in p.stdout
    m = re.search(r"resumed from \S+checkpoint-(\d+) at step (\d+)", p.stderr)
    assert m and int(m.group(2)) >= ckpts[-1] > 0, p.stderr[-2000:]
    assert (X / "data" / "train.jsonl").stat().st_mtime_ns == train_mtime
    (run_dir,) = X.glob("sft/v*")  # the same run continued, no second one
    assert (run_dir / f"checkpoint-{N}" / "adapter_model.safetensors").is_file()
    rows = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(2, N + 1, 2))  # one uninterrupted log
    assert rows[-1]["last_checkpoint"] == f"checkpoint-{N}" and rows[-1]["best_checkpoint"] is None
    assert (
        f"{run_dir}: no best checkpoint recorded (no validation): taking the newest, checkpoint-{N}"
        in p.stdout
    )
    state = json.loads((X / ".mhsft" / "state.json").read_text())
    assert state["stages"]["sft"]["status"] == "done"
    assert state["stages"]["sft"]["outputs"]["checkpoint"] == str(run_dir / f"checkpoint-{N}")

    # A changed setting reruns sft afresh (the old run is kept aside); the data stage is still skipped.
    exp.write_text(exp.read_text().replace(f"max_steps: {N}", "max_steps: 4"))
    p = run(exp, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"\] data: .*skipped", p.stdout) and "previous sft outputs moved to" in p.stdout
    assert "resumed from" not in p.stderr
    (new_run,) = X.glob("sft/v*")
    assert (new_run / "checkpoint-4").is_dir() and not (new_run / f"checkpoint-{N}").exists()
    assert list((X / ".mhsft" / "stale").glob(f"sft-*/v*/checkpoint-{N}"))


# ----------------------------------------------------------------------------------------------- whole demo
def test_whole_pipeline_with_judge_and_report(tmp_path):
    """The demo's stages at test size: base and fine-tuned scored side by side, the judge served by
    `mhsft deploy` and stopped afterwards, the report written; a rerun skips everything."""
    exp = write_yaml(
        tmp_path / "exp.yaml",
        "exp_dir: exp\nmodel: builtin:tiny\n"
        "data: {dataset: [DATA/demo_sharegpt.jsonl], test_size: 2}\n"
        "sft: {max_steps: 6, save_steps: 6, logging_steps: 1, eval_steps: 3, max_length: 256,\n"
        "      split_dataset_ratio: 0.1, learning_rate: 1.0e-2, gradient_checkpointing: false,\n"
        "      per_device_train_batch_size: 2, gradient_accumulation_steps: 1, report_to: [none]}\n"
        "export: {merge_dtype: float32}\n"
        "eval:\n  eval_dataset: [DATA/demo_mcq.jsonl, DATA/demo_qa.jsonl]\n  limit: 4\n  max_new_tokens: 8\n"
        "  max_turns: 1\n  judge_retries: 0\n  judge_mode: pairwise\n"
        "  judge_deploy: {model: builtin:tiny, max_model_len: 4096}\n"
        "review: {raters: [a, b], sample: 3}\n"
        "report: {max_samples: 3}\n",
    )
    X = tmp_path / "exp"
    p = run(exp, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "stopped the judge server" in p.stdout
    url = re.search(r"--judge_api_url (http://127\.0\.0\.1:(\d+)/v1)", p.stdout)
    assert url
    with socket.socket() as s:  # the judge no longer listens
        assert s.connect_ex(("127.0.0.1", int(url.group(2)))) != 0
    base = json.loads((X / "eval" / "base" / "results.json").read_text())
    ft = json.loads((X / "eval" / "finetuned" / "results.json").read_text())
    # one `mhsft eval` for both stages: the adapter beside the base model, one load
    assert p.stdout.count("$ mhsft eval") == 1 and "with eval_base, in one load" in p.stdout
    assert base["model"] == ft["model"] == "builtin:tiny" and base["adapter"] is None
    assert ft["adapter"] == str(next(X.glob("sft/v*/checkpoint-6")))
    assert re.search(
        r"sft/v\S+: taking its best checkpoint, checkpoint-6 \(eval_loss [\d.]+, best.json\)", p.stdout
    )
    for res in (base, ft):
        judge = res["metrics"]["test_dialogues"]["counseling"]["judge"]
        assert judge["n_judged"] == 2  # every held-out reply went to the judge
        assert res["settings"]["judge_api_url"] == url.group(1)
    assert ft["pairwise"]["versus"] == "base" and ft["pairwise"]["n_items"] == 2 and "pairwise" not in base
    # the report puts both side by side with this run's own numbers
    md = (X / "report" / "report.md").read_text(encoding="utf-8")
    head = next(ln for ln in md.splitlines() if ln.startswith("| dataset | metric"))
    assert "| base | finetuned | Δ finetuned vs base |" in head
    acc = next(ln for ln in md.splitlines() if ln.startswith("| demo_mcq | accuracy (exact)"))
    for res in (base, ft):
        assert f"{100 * res['metrics']['demo_mcq']['multiple_choice']['accuracy']:.1f}%" in acc
    # the review study of both evaluations, its links printed, and the report's section on it
    links = re.findall(r"^  ([ab]): (http://127\.0\.0\.1:8770/r/\S+)$", p.stdout, re.M)
    assert [r for r, _ in links] == ["a", "b"] and (X / "review" / "study.db").is_file()
    assert "## Human review" in md and "0 of 6 ratings" in md
    html = (X / "report" / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 2 and "builtin:tiny is a tiny model" in html
    assert (X / "report" / "figures" / "curves.png").is_file()

    p = run(exp, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.count("skipped") == 7, p.stdout
    assert "starting the judge" not in p.stdout
    p = run(exp, "--from", "report", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.count("skipped") == 6 and "$ mhsft report" in p.stdout

    # a release gate in the report section: the report is rewritten, the gate's shortfall fails the run
    (tmp_path / "gate.yaml").write_text("crisis_lexical_pass_rate: 1.0\n", encoding="utf-8")
    exp.write_text(
        exp.read_text().replace("report: {max_samples: 3}", "report: {max_samples: 3, gate: gate.yaml}")
    )
    p = run(exp, cwd=tmp_path)
    assert p.returncode == 1 and "stage report failed (exit 1)" in p.stderr
    assert "gate FAILED: finetuned: crisis_lexical_pass_rate: not measured" in p.stdout + p.stderr
    assert json.loads((X / "report" / "gate.json").read_text())["passed"] is False


def test_failed_stage_stops_the_judge_and_says_how_to_continue(tmp_path):
    exp = write_yaml(
        tmp_path / "exp.yaml",
        "exp_dir: exp\nmodel: builtin:tiny\n"
        "eval: {eval_dataset: [DATA/no_such_set.jsonl], judge_deploy: {model: builtin:tiny}}\n",
    )
    p = run(exp, cwd=tmp_path)
    assert p.returncode == 1 and "no_such_set.jsonl" in p.stderr
    assert "stage eval_base failed (exit 2)" in p.stderr and "finished stages are skipped" in p.stderr
    assert "stopped the judge server" in p.stdout
    port = int(re.search(r"--port (\d+)", p.stdout).group(1))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    state = json.loads((tmp_path / "exp" / ".mhsft" / "state.json").read_text())
    assert state["stages"]["eval_base"]["status"] == "running"
    with pytest.raises(UserError, match="this experiment's stages are eval_base"):
        pipeline.main([str(exp), "--from", "sft"])
