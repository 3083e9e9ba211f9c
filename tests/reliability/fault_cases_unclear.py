"""The fault sweep's cases, part 2: the reliability issue's "unclear errors" list (each should be one line naming
the option or file), with SIGINT during training and the offline pretrained download."""
from __future__ import annotations

import math
import os
import signal

import torch

from tests.reliability.fault_cases import ISSUE_UNCLEAR, _popen, _wait_for
from tests.reliability.fault_harness import Outcome, case, run_api, run_cli


# ---------------------------------------------------------------------------------------------- unclear errors
for _name, _opts, _names in [
    ("n_ctx_negative", {"n_ctx": -3}, ("n_ctx",)), ("n_ctx_float", {"n_ctx": 2.5}, ("n_ctx",)),
    ("n_ctx_bool", {"n_ctx": True}, ("n_ctx",)), ("n_ctx_string", {"n_ctx": "4"}, ("n_ctx",)),
    ("init_std_nan", {"init_std": math.nan}, ("init_std",)), ("init_std_negative", {"init_std": -1.0}, ("init_std",)),
    ("ctx_init_double_space", {"ctx_init": "a  photo of a"}, ("ctx_init",)),
    ("csc_string", {"csc": "yes"}, ("csc",)), ("unknown_option_typo", {"nctx": 4}, ("nctx",)),
]:
    def _opt_case(s, opts=_opts):
        return run_api(lambda: s.learner(**opts))

    _opt_case.__name__ = f"create_learner_{_name}"
    case(ISSUE_UNCLEAR, f"create_learner('coop', ..., **{_opts})", api=True, names=_names)(_opt_case)


@case(ISSUE_UNCLEAR, "learner(images) with an empty batch [0, 3, 32, 32]", api=True, names=("empty batch",))
def empty_batch(s):
    learner = s.learner()
    return run_api(lambda: learner(torch.zeros(0, 3, 32, 32, dtype=torch.float64)))


@case(ISSUE_UNCLEAR, "from_pretrained on an adapter whose safetensors file is truncated", api=True,
      names=("prompt_learner.safetensors",))
def truncated_safetensors(s):
    import fastprompt

    directory = s.fresh("adapter")
    s.learner().save_pretrained(directory)
    path = os.path.join(directory, "prompt_learner.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return run_api(lambda: fastprompt.from_pretrained(directory, clip_model=s.clip))


@case(ISSUE_UNCLEAR, "`eval --run` whose run_config.json is truncated", names=("run_config.json",))
def truncated_run_config(s):
    import shutil

    run = s.fresh("cut-config")
    shutil.copytree(s.good_run, run)
    path = os.path.join(run, "run_config.json")
    text = open(path).read()
    open(path, "w").write(text[: len(text) // 2])
    return run_cli(["eval", "--run", run, "--dataset", "caltech101", "--device", "cpu", "--no-progress"])


@case(ISSUE_UNCLEAR, "from_pretrained with a truncated fastprompt_config.json (the readable copy; weights intact): "
      "loads from the weights file's own config", "accept")
def truncated_config_copy(s):
    import fastprompt

    directory = s.fresh("adapter")
    learner = s.learner()
    learner.save_pretrained(directory)
    path = os.path.join(directory, "fastprompt_config.json")
    text = open(path).read()
    open(path, "w").write(text[: len(text) // 2])
    o = run_api(lambda: setattr(s, "_loaded", fastprompt.from_pretrained(directory, clip_model=s.clip)))
    if o.code == 0 and not torch.equal(s._loaded.ctx, learner.ctx):
        o.wrong = "loaded other values"
    return o


@case(ISSUE_UNCLEAR, "FASTPROMPT_BACKEND=torch (listed in the README)", "accept")
def backend_env_torch(s):
    return run_api(lambda: s.learner(), env={"FASTPROMPT_BACKEND": "torch"})


@case(ISSUE_UNCLEAR, "FASTPROMPT_BACKEND=tpu", api=True, names=("FASTPROMPT_BACKEND",))
def backend_env_bad(s):
    return run_api(lambda: s.learner(), env={"FASTPROMPT_BACKEND": "tpu"})


@case(ISSUE_UNCLEAR, "`train --opts TRAINER.COOP.N_CTX -3`", names=("n_ctx",))
def opts_n_ctx_negative(s):
    return run_cli(s.run_args("--opts", "TRAINER.COOP.N_CTX", "-3"))


@case(ISSUE_UNCLEAR, "`train --device tpu`", names=("--device",))
def device_tpu(s):
    return run_cli(s.run_args("--device", "tpu"))


@case(ISSUE_UNCLEAR, "`train --pretrained garbage.pt` (a file that is not a checkpoint)", names=("--pretrained",
                                                                                                "garbage.pt"))
def garbage_pretrained_file(s):
    path = s.write("garbage.pt", b"not a checkpoint at all", binary=True)
    return run_cli(s.run_args("--pretrained", path))


@case(ISSUE_UNCLEAR, "`train --model ViT-B-16 --pretrained openai` offline: fail within 30 s saying what to do",
      names=("--pretrained", "openai"), limit_s=30)
def pretrained_tag_offline(s):
    return run_cli(s.run_args("--model", "ViT-B-16", "--pretrained", "openai"))


@case(ISSUE_UNCLEAR, "Ctrl-C (SIGINT) during `fastprompt train`: print the --resume command, no traceback",
      names=("--resume",), report=True)
def sigint_during_train(s):
    out = s.fresh("sigint")
    proc = _popen(s.run_args(out=out, epochs=50))
    if not _wait_for(os.path.join(out, "checkpoint.pt"), proc):
        stdout, stderr = proc.communicate()
        return Outcome(proc.returncode, stdout, stderr, note="ended before its first checkpoint")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    o = Outcome(proc.returncode, stdout, stderr, note=f"exit {proc.returncode}")
    if proc.returncode < 0:
        o.crashed = f"killed by signal {-proc.returncode}"
    return o


@case(ISSUE_UNCLEAR, "`bench --classes 0`", names=("--classes",))
def bench_classes_zero(s):
    return run_cli(["bench", "--method", "coop", "--classes", "0"])


@case(ISSUE_UNCLEAR, "`bench --repeats 0`", names=("--repeats",))
def bench_repeats_zero(s):
    return run_cli(["bench", "--repeats", "0"])


@case(ISSUE_UNCLEAR, "`bench --json missing/folder/x.json`: refused before the run", names=("--json",), limit_s=20)
def bench_json_missing_folder(s):
    return run_cli(["bench", "--json", os.path.join(s.fresh("missing"), "x.json")])


@case(ISSUE_UNCLEAR, "`train --model bad.json` (malformed JSON)", names=("bad.json",))
def malformed_model_json(s):
    s.bad_model = s.write("bad.json", "{not json")
    return run_cli(s.run_args("--model", s.bad_model))


@case(ISSUE_UNCLEAR, "a good --model JSON after a malformed one in the same process still builds", "accept")
def model_registry_not_poisoned(s):
    from fastprompt.training.runner import build_clip

    run_cli(s.run_args("--model", s.write("bad.json", "{not json")))
    return run_api(lambda: build_clip(s.model, None, torch.device("cpu")))


