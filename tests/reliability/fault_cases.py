"""The fault sweep's cases, part 1: the reliability issue's "data loss and silent wrong results" list, with the
kill -9 loops and the two-process race. Part 2 (``fault_cases_unclear.py``): the issue's "unclear errors" list.
Part 3 (``fault_cases_inputs.py``): other bad inputs of every command and of the Python API. Each case returns
an :class:`Outcome`; ``fault_sweep.py`` classifies it against the case's declared behaviour."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch

from tests.reliability.fault_harness import (
    REPO, Outcome, case, run_api, run_cli, run_process, subprocess_env,
)

ISSUE_LOSS = "issue: loss/silent"
ISSUE_UNCLEAR = "issue: unclear"


# ---------------------------------------------------------------------------------------------- helpers
def _fork(target) -> int:
    """A forked child running ``target`` (exit 0, or 1 if it raised)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            target()
        except BaseException:  # noqa: BLE001 - the child's failure is its exit status
            code = 1
        os._exit(code)
    return pid


def _exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _two_adapters(s):
    """Two different saves (2 and 3 context vectors, other classes), to tell a mixed save from a whole one."""
    torch.manual_seed(1)
    a = s.learner(("cat", "dog", "car"), n_ctx=2)
    torch.manual_seed(2)
    b = s.learner(("tree", "house", "boat", "bird"), n_ctx=3)
    return a, b


def _whole(s, directory, a, b) -> str:
    """'' if ``directory`` loads as exactly ``a`` or ``b``, else what is wrong."""
    import fastprompt

    try:
        got = fastprompt.from_pretrained(directory, clip_model=s.clip)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        return f"does not load: {type(exc).__name__}: {exc}"
    want = a if got.config.n_ctx == 2 else b
    if list(got.classnames) != list(want.classnames) or not torch.equal(got.ctx, want.ctx):
        return f"config of one save beside the weights of another (n_ctx {got.config.n_ctx})"
    return ""


def _tmp_files(directory: str):
    return [n for n in os.listdir(directory) if ".tmp." in n]


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 180, epoch_above: int = 0) -> bool:
    """Wait until ``path`` exists (and, for a checkpoint, records an epoch > ``epoch_above``) while ``proc`` runs."""
    from fastprompt.training import load_checkpoint

    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if os.path.exists(path):
            if not epoch_above:
                return True
            try:
                if load_checkpoint(path)["epoch"] > epoch_above:
                    return True
            except Exception:  # noqa: BLE001 - being replaced right now: look again
                pass
        time.sleep(0.05)
    return False


def _popen(argv):
    return subprocess.Popen([sys.executable, "-m", "fastprompt.cli", *argv], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------------------------------------- 1. crash-safe saves
@case(ISSUE_LOSS, "kill -9 at random instants during save_pretrained (20 kills): the adapter on disk loads as one "
      "whole save after every kill", "accept")
def kill9_during_save_pretrained(s):
    a, b = _two_adapters(s)
    directory = s.fresh("kill9-adapter")
    a.save_pretrained(directory)
    rng = random.Random(0)
    mid_write = 0
    for kill in range(20):
        pid = _fork(lambda: [(a if k % 2 else b).save_pretrained(directory) for k in range(100000)])
        time.sleep(rng.uniform(0.01, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mid_write += bool(_tmp_files(directory))  # the next writer removes them: count before it starts
        problem = _whole(s, directory, a, b)
        if problem:
            return Outcome(0, lost=f"after kill {kill + 1}: {problem}")
    return Outcome(0, note=f"20 kills ({mid_write} inside a write, temporaries left), whole every time")


@case(ISSUE_LOSS, "a writer killed inside a save leaves temporaries: the next save_pretrained removes them",
      "accept")
def orphans_removed_by_next_save(s):
    a, b = _two_adapters(s)
    directory = s.fresh("orphans")
    a.save_pretrained(directory)
    rng = random.Random(2)
    for kill in range(60):  # until a kill lands inside a write
        pid = _fork(lambda: [(a if k % 2 else b).save_pretrained(directory) for k in range(100000)])
        time.sleep(rng.uniform(0.01, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        before = _tmp_files(directory)
        if before:
            break
    else:
        return Outcome(None, err="Traceback (most recent call last)\nno kill landed inside a write in 60 tries")
    a.save_pretrained(directory)
    left = _tmp_files(directory)
    return Outcome(0, wrong=f"{len(left)} temporary files left: {left[:3]}" if left else "",
                   note=f"kill {kill + 1} left {before}; the next save removed them" if not left else "")


@case(ISSUE_LOSS, "two processes calling save_pretrained on one directory at once (2 x 30 saves): no crash, "
      "a whole adapter", "accept")
def concurrent_save_pretrained(s):
    a, b = _two_adapters(s)
    directory = s.fresh("concurrent-adapter")
    a.save_pretrained(directory)
    pids = [_fork(lambda: [a.save_pretrained(directory) for _ in range(30)]),
            _fork(lambda: [b.save_pretrained(directory) for _ in range(30)])]
    codes = [_exit_code(p) for p in pids]
    o = Outcome(0, lost=_whole(s, directory, a, b))
    if codes != [0, 0]:
        o.crashed = f"writer exit codes {codes}"
    if _tmp_files(directory):
        o.wrong = f"temporary files left: {_tmp_files(directory)}"
    return o


@case(ISSUE_LOSS, "kill -9 during training-checkpoint writes (12 kills), then one save: no "
      "checkpoint.pt.tmp.<pid> orphans, the checkpoint loads", "accept")
def kill9_during_checkpoint_writes(s):
    from fastprompt.training.checkpoint import save_checkpoint

    folder = s.fresh("kill9-checkpoint")
    os.makedirs(folder)
    path = os.path.join(folder, "checkpoint.pt")
    payload = {"x": torch.randn(64, 4096)}
    rng = random.Random(1)
    mid_write = 0
    for _ in range(12):
        pid = _fork(lambda: [save_checkpoint(path, dict(payload, epoch=k)) for k in range(100000)])
        time.sleep(rng.uniform(0.01, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mid_write += len(os.listdir(folder)) > 1  # an orphan now: that kill landed inside a write
    save_checkpoint(path, dict(payload, epoch=-1))
    o = Outcome(0, note=f"{mid_write} of 12 kills inside a write")
    if os.listdir(folder) != ["checkpoint.pt"]:
        o.wrong = f"left behind: {sorted(os.listdir(folder))}"
    elif torch.load(path, weights_only=True)["epoch"] != -1:
        o.lost = "the last checkpoint is not the one saved last"
    return o


# ---------------------------------------------------------------------------------------------- 2. run-directory race
@case(ISSUE_LOSS, "two `fastprompt train` processes started together into one --output-dir: one trains, the other "
      "refuses naming the holder; the winner's results and log are not mixed", "refuse", names=("in use", "pid"))
def two_trains_race_one_output_dir(s):
    out = s.fresh("race")
    argv = s.run_args(out=out, epochs=4)
    procs = [_popen(argv), _popen(argv)]
    done = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    if codes == [0, 0]:
        return Outcome(0, note="both exited 0")
    if any(c < 0 for c in codes):
        return Outcome(1, crashed=f"exit codes {codes}")
    loser = 0 if codes[0] != 0 else 1
    o = Outcome(codes[loser], done[loser][0], done[loser][1], note=f"exit codes {codes}")
    if 0 not in codes:
        o.wrong = f"neither run finished: {done[1 - loser][1].strip().splitlines()[-1:]}"
        return o
    try:
        with open(os.path.join(out, "log.jsonl")) as f:
            events = [json.loads(line) for line in f]
        epochs = [e["epoch"] for e in events if e.get("event") == "epoch"]
        with open(os.path.join(out, "results.json")) as f:
            finished = json.load(f)["finished"]
        if sum(e.get("event") == "start" for e in events) != 1 or epochs != [1, 2, 3, 4] or not finished:
            o.lost = f"interleaved log or unfinished results: epochs {epochs}"
    except (OSError, ValueError, KeyError) as exc:
        o.lost = f"results/log damaged: {exc}"
    return o


# ---------------------------------------------------------------------------------------------- 3. divergence
@case(ISSUE_LOSS, "`train --lr 1e30`: stop on the non-finite loss with exit 1, keep the last good checkpoint, "
      "write no adapter or results", "refuse", names=("diverged", "--lr"))
def huge_lr_diverges(s):
    from fastprompt.training import load_checkpoint

    out = s.fresh("lr1e30")
    o = run_cli(s.run_args("--lr", "1e30", out=out, epochs=2))
    written = [n for n in ("adapter", "results.json") if os.path.exists(os.path.join(out, n))]
    if written:
        o.wrong = f"wrote {written} after diverging"
    elif o.code != 0:
        try:
            ckpt = load_checkpoint(os.path.join(out, "checkpoint.pt"))
            if not all(torch.isfinite(t).all() for t in ckpt["trainable"].values()):
                o.lost = "the kept checkpoint holds non-finite values"
        except Exception as exc:  # noqa: BLE001
            o.lost = f"no good checkpoint kept: {exc}"
    return o


for _value in ("inf", "nan", "-0.1"):
    def _lr_case(s, value=_value):
        out = s.fresh("lr")
        o = run_cli(s.run_args("--lr", value, out=out))
        if os.path.exists(out):
            o.note = "left the output directory behind"
        return o

    _lr_case.__name__ = f"lr_{_value.replace('-', 'minus_').replace('.', '_')}"
    case(ISSUE_LOSS, f"`train --lr {_value}`", names=("--lr",))(_lr_case)


# ---------------------------------------------------------------------------------------------- 4. exact resume
def _adapters_equal(x: str, y: str) -> str:
    from fastprompt.learners._common import load_pretrained_tensors

    a, b = load_pretrained_tensors(x), load_pretrained_tensors(y)
    if a.keys() != b.keys():
        return f"different tensors {sorted(a)} vs {sorted(b)}"
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    return "" if diff == 0 else f"resumed run differs from the uninterrupted one: max |diff| {diff:.3g}"


@case(ISSUE_LOSS, "resume with another --num-workers (stopped after epoch 1 with 0 workers, resumed with 2): "
      "bit-identical to the uninterrupted run", "accept")
def resume_with_other_num_workers(s):
    import dataclasses

    from fastprompt.training.config import TrainConfig
    from fastprompt.training.runner import train_run

    base = TrainConfig(method="coop", model=s.model, pretrained=None, dataset="caltech101", root=s.root, shots=2,
                       epochs=2, batch_size=2, lr=0.01, device="cpu", num_workers=0, progress=False,
                       learner={"n_ctx": 2})
    full, cut = s.fresh("full"), s.fresh("cut")
    train_run(dataclasses.replace(base, output_dir=full))
    train_run(dataclasses.replace(base, output_dir=cut), stop_after_epoch=1)
    train_run(dataclasses.replace(base, output_dir=cut, num_workers=2), resume=True)
    return Outcome(0, wrong=_adapters_equal(os.path.join(full, "adapter"), os.path.join(cut, "adapter")))


@case(ISSUE_LOSS, "`fastprompt train` killed with -9 twice mid-run and resumed with --resume each time: the final "
      "adapter is bit-identical to an uninterrupted run", "accept")
def kill9_train_then_resume(s):
    full, cut = s.fresh("full"), s.fresh("killed")
    reference = run_cli(s.run_args(out=full, epochs=4))
    if reference.code != 0:
        return Outcome(None, err=reference.err)
    from fastprompt.training import load_checkpoint

    ckpt = os.path.join(cut, "checkpoint.pt")
    argv = s.run_args(out=cut, epochs=4)
    killed_after = []
    for kill, after in enumerate((0, 1)):
        proc = _popen(argv if kill == 0 else argv[:1] + ["--resume"] + argv[1:])
        if not _wait_for(ckpt, proc, epoch_above=after):
            proc.kill()
            return Outcome(1, crashed=f"run {kill + 1} ended before its checkpoint: {proc.communicate()[1][-500:]}")
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        killed_after.append(load_checkpoint(ckpt)["epoch"])
    resumed = run_process(argv[:1] + ["--resume"] + argv[1:])
    if resumed.code != 0:
        resumed.wrong = "the resumed run failed"
        return resumed
    return Outcome(0, wrong=_adapters_equal(os.path.join(full, "adapter"), os.path.join(cut, "adapter")),
                   note=f"killed with epochs {killed_after} of 4 checkpointed, then resumed to the end")


# ---------------------------------------------------------------------------------------------- 5. backbone identity
@case(ISSUE_LOSS, "from_pretrained onto another CLIP of the same text width (text tower changed)", api=True,
      names=("strict_backbone",))
def adapter_on_other_backbone(s):
    from tests.conftest import tiny_clip

    import fastprompt

    directory = s.fresh("adapter")
    s.learner().save_pretrained(directory)
    other = tiny_clip()
    with torch.no_grad():
        other.token_embedding.weight.mul_(1.5)
    return run_api(lambda: fastprompt.from_pretrained(directory, clip_model=other))


@case(ISSUE_LOSS, "`eval` of a run whose --model JSON was since edited (another text tower, same width)",
      names=("--allow-backbone-mismatch",))
def eval_after_model_file_changed(s):
    import shutil

    run = s.fresh("moved-run")
    shutil.copytree(s.good_run, run)
    with open(os.path.join(run, "run_config.json")) as f:
        cfg = json.load(f)
    changed = dict(json.load(open(s.model)))
    changed["text_cfg"] = dict(changed["text_cfg"], layers=2)
    cfg["model"] = s.write("other-model.json", json.dumps(changed))
    with open(os.path.join(run, "run_config.json"), "w") as f:
        json.dump(cfg, f)
    return run_cli(["eval", "--run", run, "--dataset", "caltech101", "--device", "cpu", "--num-workers", "0",
                    "--no-progress"])


# ---------------------------------------------------------------------------------------------- 6. class names
@case(ISSUE_LOSS, "duplicate class names after '_' -> space and case: ['cat', 'golden_retriever', "
      "'Golden  Retriever']", api=True, names=("golden retriever",))
def duplicate_classnames(s):
    return run_api(lambda: s.learner(("cat", "golden_retriever", "Golden  Retriever")))


@case(ISSUE_LOSS, "split file whose entries give label 0 two class names", names=("label 0", "two class names"))
def split_label_two_names(s):
    root, split, _ = s.data_copy("twonames")
    data = json.load(open(split))
    data["test"][0][2] = "another name"
    json.dump(data, open(split, "w"))
    return run_cli(s.run_args(root=root))


@case(ISSUE_LOSS, "a class with no training image (split file lists none for 'anchor')", "warn", names=("anchor",))
def class_without_training_images(s):
    root, split, _ = s.data_copy("notrain")
    data = json.load(open(split))
    data["train"] = [item for item in data["train"] if item[2] != "anchor"]
    json.dump(data, open(split, "w"))
    return run_cli(s.run_args("--shots", "1", root=root))


# ---------------------------------------------------------------------------------------------- 7. bad images
def _damaged_image_run(s, tag, split, how, command="train"):
    root, _, splits = s.data_copy(tag)
    victim = getattr(splits, split)[0].impath
    if how == "empty":
        open(victim, "wb").close()
    elif how == "text":
        with open(victim, "w") as f:
            f.write("this is not an image\n")
    else:  # pixel data cut after an intact header
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 3)
    if command == "train":
        o = run_cli(s.run_args(root=root))
    else:
        o = run_cli(["datasets", "--root", root, "--dataset", "caltech101", "--no-progress"])
    victim_name = os.path.basename(os.path.dirname(victim)) + os.sep + os.path.basename(victim)
    if victim_name not in o.err + o.out:
        o.note = f"does not name {victim_name}"
    return o


@case(ISSUE_LOSS, "a zero-byte training image", names=("image_0000.jpg",))
def zero_byte_train_image(s):
    return _damaged_image_run(s, "empty", "train_x", "empty")


@case(ISSUE_LOSS, "a text file named .jpg among the test images", names=("image_0003.jpg",))
def non_image_test_file(s):
    return _damaged_image_run(s, "text", "test", "text")


@case(ISSUE_LOSS, "a test image truncated after its header (found only when decoded, after training)",
      names=("image_0003.jpg",))
def truncated_test_image(s):
    return _damaged_image_run(s, "cut", "test", "cut")


@case(ISSUE_LOSS, "`fastprompt datasets` on a root with a truncated test image", names=("image_0003.jpg",),
      report=True)
def datasets_names_truncated_image(s):
    return _damaged_image_run(s, "dcut", "test", "cut", command="datasets")


@case(ISSUE_LOSS, "`fastprompt datasets` on a root with a zero-byte training image", names=("image_0000.jpg",),
      report=True)
def datasets_names_empty_image(s):
    return _damaged_image_run(s, "dempty", "train_x", "empty", command="datasets")


# ---------------------------------------------------------------------------------------------- 8. stale cache
@case(ISSUE_LOSS, "eval-mode text-feature cache after `learner.ctx.data += 1` under no_grad: logits change",
      "accept")
def stale_cache_after_in_place_edit(s):
    learner = s.learner().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = learner(images)
        learner.ctx.data += 1
        after = learner(images)
    learner.clear_cache()
    with torch.no_grad():
        fresh = learner(images)
    wrong = "" if torch.equal(after, fresh) and not torch.equal(before, after) else "stale logits after the edit"
    return Outcome(0, wrong=wrong)
