"""Exact resume of learners with state kept across epochs: PromptSRC's Gaussian prompt aggregation (GPA) sums
and DAPT's class prototypes go into the trainer's checkpoint (``training_state_dict``)."""
from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt.learners._deep_prompts import gaussian_epoch_weights
from fastprompt.training import Trainer, load_checkpoint, save_checkpoint
from tests.learners.test_maple import tiny_deep_clip
from tests.training.helpers import NoisyTensorDataset, train_config

NAMES = ["cat", "dog", "golden retriever"]
# Depth 3 = every block of the 3 + 3-layer tower; GPA peaked inside the 4 epochs so every epoch weighs in.
SRC = dict(n_ctx_text=2, n_ctx_vision=2, prompt_depth_text=3, prompt_depth_vision=3, gpa_mean=2.5, gpa_std=1.0)
EPOCHS = 4


def _promptsrc(seed):
    torch.manual_seed(seed)
    return fastprompt.create_learner("promptsrc", tiny_deep_clip(), NAMES, **SRC)


def _fit_src(directory, seed=0, stop=None, resume=False, record=None):
    learner = _promptsrc(seed)
    if record is not None:  # the trainable tensors each epoch ends with, before GPA touches them
        hook = learner.on_epoch_end

        def on_epoch_end(epoch, max_epoch):
            record.append({k: v.clone() for k, v in learner.trainable_state_dict().items()})
            hook(epoch, max_epoch)

        learner.on_epoch_end = on_epoch_end
    cfg = train_config(method="promptsrc", epochs=EPOCHS, batch_size=2, lr=0.05)
    Trainer(learner, NoisyTensorDataset(4, 3), cfg, output_dir=str(directory)).fit(resume=resume, stop_after_epoch=stop)
    return learner


@pytest.fixture(scope="module")
def src_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("promptsrc")
    thetas = []
    full = _fit_src(base / "full", record=thetas)
    _fit_src(base / "cut", stop=2)  # "killed" after epoch 2
    mid = load_checkpoint(str(base / "cut" / "checkpoint.pt"))
    resumed = _fit_src(base / "cut", seed=99, resume=True)  # a fresh process: other init, only the checkpoint helps
    return base, full, resumed, thetas, mid


def test_promptsrc_resume_equals_uninterrupted(src_runs):
    _, full, resumed, _, mid = src_runs
    # the epoch-2 checkpoint carries GPA's running sums over epochs 1..2
    extra = mid["learner_extra"]
    assert mid["epoch"] == 2 and extra["gpa_max_epoch"] == EPOCHS
    assert set(extra["gpa_sums"]) == set(full.trainable_state_dict())
    a, b = full.trainable_state_dict(), resumed.trainable_state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert full.gpa.sums is None and resumed.gpa.sums is None  # aggregation finished and loaded in both


def test_final_tensors_are_the_gpa_aggregate(src_runs):
    """The uninterrupted run ends at sum_e w_e theta_e (the formula, recomputed here from the recorded epochs)."""
    _, full, _, thetas, _ = src_runs
    w = gaussian_epoch_weights(SRC["gpa_mean"], SRC["gpa_std"], EPOCHS)
    assert len(thetas) == EPOCHS and min(w) > 1e-3
    for name, value in full.trainable_state_dict().items():
        expected = sum(w[e] * thetas[e][name] for e in range(EPOCHS))
        assert torch.allclose(value, expected, rtol=1e-12, atol=1e-15), name
        assert not torch.equal(value, thetas[-1][name])  # really aggregated, not the last epoch's tensors


def test_resume_without_gpa_state_would_differ(src_runs, tmp_path):
    """Control: drop the learner state from the epoch-2 checkpoint and the resumed run ends elsewhere (the
    equality above is due to the state methods, not to GPA being a no-op on this problem)."""
    base, full, _, _, mid = src_runs
    save_checkpoint(str(tmp_path / "checkpoint.pt"), dict(mid, learner_extra=None))
    broken = _fit_src(tmp_path, seed=99, resume=True)
    a, b = full.trainable_state_dict(), broken.trainable_state_dict()
    assert any(not torch.allclose(a[k], b[k], rtol=1e-6, atol=0) for k in a)


def test_promptsrc_state_errors():
    learner = _promptsrc(0)
    state = learner.training_state_dict()
    assert state == {"gpa_sums": None, "gpa_max_epoch": None}
    learner.load_training_state_dict(state)
    with pytest.raises(ValueError, match="gpa_sums"):
        learner.load_training_state_dict({"sums": None})
    bad = {"gpa_sums": {"prompts.ctx": torch.zeros(1)}, "gpa_max_epoch": 4}
    with pytest.raises(ValueError, match="do not match"):
        learner.load_training_state_dict(bad)
    sums = {k: torch.zeros(1) for k in learner.trainable_state_dict()}
    with pytest.raises(ValueError, match="shape"):
        learner.load_training_state_dict({"gpa_sums": sums, "gpa_max_epoch": 4})


# ---------------------------------------------------------------------- DAPT prototypes
@pytest.fixture(scope="module")
def synthetic_splits(tmp_path_factory):
    from fastprompt.datasets import build_dataset, make_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(str(root), "caltech101", num_classes=3, images_per_class=5)
    return build_dataset("caltech101", str(root), shots=2, seed=1)


DAPT_TOKENS = {"vis_num_tokens": 2, "txt_num_tokens": 2}
# DAPT alone, and CaPT over DAPT (a plug-in: its base's prototypes go through the forwarded resume state).
DAPT_SETUPS = {"dapt": ("dapt", DAPT_TOKENS), "capt-over-dapt": ("capt", {"base": "dapt", "base_config": DAPT_TOKENS})}


def _dapt_of(learner):
    return learner if learner.method == "dapt" else learner.base


def _fit_dapt(directory, splits, seed=0, stop=None, resume=False, calls=None, setup="dapt"):
    from tests.conftest import tiny_clip

    method, options = DAPT_SETUPS[setup]
    torch.manual_seed(seed)
    learner = fastprompt.create_learner(method, tiny_clip(), splits.classnames, config=dict(options))
    if calls is not None:
        attach = learner.attach_train_data
        learner.attach_train_data = lambda data: calls.append(1) or attach(data)
    data = NoisyTensorDataset(len(splits.train_x), len(splits.classnames))
    Trainer(learner, data, train_config(method=method, epochs=3, batch_size=2), output_dir=str(directory),
            splits=splits).fit(resume=resume, stop_after_epoch=stop)
    return learner


@pytest.mark.parametrize("setup", list(DAPT_SETUPS))
def test_dapt_prototypes_are_checkpointed(tmp_path, synthetic_splits, setup):
    full = _fit_dapt(tmp_path / "full", synthetic_splits, setup=setup)
    _fit_dapt(tmp_path / "cut", synthetic_splits, stop=1, setup=setup)
    payload = load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))
    assert torch.equal(payload["learner_extra"]["prototypes"], _dapt_of(full).prototypes)
    # Resume in a fresh process whose prototypes would come out different if they were recomputed: the
    # checkpoint's are used and attach_train_data is not called again.
    with torch.no_grad():
        payload["learner_extra"]["prototypes"] += 0.25  # a marker only the checkpoint can carry
    save_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"), payload)
    calls = []
    resumed = _fit_dapt(tmp_path / "cut", synthetic_splits, seed=5, resume=True, calls=calls, setup=setup)
    assert calls == [] and torch.equal(_dapt_of(resumed).prototypes, payload["learner_extra"]["prototypes"])
    # and an untouched checkpoint resumes to exactly the uninterrupted run
    _fit_dapt(tmp_path / "cut2", synthetic_splits, stop=1, setup=setup)
    again = _fit_dapt(tmp_path / "cut2", synthetic_splits, seed=5, resume=True, setup=setup)
    a, b = full.trainable_state_dict(), again.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dapt_state_without_prototypes_is_none_and_checked(synthetic_splits):
    from tests.conftest import tiny_clip

    learner = fastprompt.create_learner("dapt", tiny_clip(), synthetic_splits.classnames, vis_num_tokens=2,
                                        txt_num_tokens=2)
    assert learner.training_state_dict() is None  # nothing to save: a resumed run attaches the data itself
    with pytest.raises(ValueError, match="prototypes"):
        learner.load_training_state_dict({"prototypes": None})
    with pytest.raises(ValueError, match=r"\[3, 48\]"):
        learner.load_training_state_dict({"prototypes": torch.zeros(2, 48)})


# ---------------------------------------------------------------------- DPC (state kept in dpc.py: its sampler RNG)
def _fit_dpc(directory, splits, stop=None, resume=False):
    from fastprompt.training.data import DatumDataset, train_transform
    from tests.conftest import tiny_clip

    clip = tiny_clip(dtype=torch.float32)
    torch.manual_seed(0)
    learner = fastprompt.create_learner("dpc", clip, splits.classnames, top_k=2, seed=0, backbone_config={"n_ctx": 2})
    data = DatumDataset(splits.train_x, train_transform(clip))
    Trainer(learner, data, train_config(method="dpc", epochs=3, batch_size=3, lr=0.01), output_dir=str(directory),
            splits=splits).fit(resume=resume, stop_after_epoch=stop)
    return learner.trainable_state_dict()


@pytest.fixture(scope="module")
def dpc_runs(tmp_path_factory, synthetic_splits):
    base = tmp_path_factory.mktemp("dpc")
    full = _fit_dpc(base / "full", synthetic_splits)
    _fit_dpc(base / "cut", synthetic_splits, stop=1)
    return full, _fit_dpc(base / "cut", synthetic_splits, resume=True)


def test_dpc_checkpoint_resumes(dpc_runs):
    """DPC's checkpoint holds its frozen tuned prompt P ("tuned.*") beside the trained P'; the compatibility
    check compares with the learner's own trainable_state_dict, so the run resumes."""
    full, resumed = dpc_runs
    assert set(full) == set(resumed) and any(k.startswith("tuned.") for k in full)
    assert all(torch.equal(full[k], resumed[k]) for k in full if k.startswith("tuned."))


def test_dpc_resume_is_exact(dpc_runs):
    full, resumed = dpc_runs
    assert all(torch.equal(full[k], resumed[k]) for k in full)
