"""Cross-check of our format adapters against the real SAELens and dictionary_learning.

Slow and opt-in (``make crosscheck``, or ``pytest -m slow tests/zoo/test_peer_crosscheck.py``):
each peer runs in its own virtualenv under ``benchmarks/.peers/``, created on first use by
``benchmarks/peers.py`` (the benchmark's set-up code); without PyPI access the tests skip.
The peers' halves are the scripts in ``tests/zoo/peer_scripts/``, run by the peer venv's
python, one subprocess per library (importing either library takes about 10 s).

- SAELens, our files -> its loader: every dictionary we can write in SAELens's format is
  written with ``write_folder(..., format="saelens")`` and loaded with SAELens's own
  ``SAE.load_from_disk``; its ``encode``, ``decode`` and ``forward`` must equal ours.
- SAELens, its files -> our reader: SAELens builds each architecture (and the inference
  export of its TopK and BatchTopK training SAEs), gives it random weights and saves it with
  ``save_model`` / ``save_inference_model``; ``read_folder`` must give the same function.
- dictionary_learning, its files -> our reader: each dictionary class is built by its real
  trainer and saved by its own ``trainSAE`` (``config.json`` + ``ae.pt``).
- SAELens's downstream metrics: on a tiny trained GPT-2 with a real tokenizer, a fixed SAE
  and fixed token batches (BOS, EOS, chat markers and ``<unk>`` among them), SAELens's own
  ``run_evals`` (on the same weights as a TransformerLens ``HookedTransformer``) and our
  ``splice_evaluation`` must give the same CE loss score and KL divergence score, with
  SAELens's default ``exclude_special_tokens=True`` and with ``False``.

All weights are random with non-zero biases and uneven decoder norms, so every centring,
threshold, gate and norm-folding path changes the numbers; each case also checks that its
codes are neither all zero nor all active.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from benchmarks.peers import install_peer, peer_python
from lightning_interp import create_dictionary
from lightning_interp.backbones import Backbone
from lightning_interp.metrics.downstream import (
    CrossEntropyLossRecovered,
    SplicedKLDivergence,
    splice_evaluation,
)
from lightning_interp.zoo.formats import read_folder, write_folder
from tests.metrics import lm_helpers

pytestmark = [pytest.mark.slow, pytest.mark.integration]

D, F, D_OUT, K = 16, 64, 12, 8
ATOL = 1e-5
SCRIPTS = Path(__file__).parent / "peer_scripts"
TRANSCODER = {"d_out": D_OUT, "apply_b_dec_to_input": False}

# name -> (our architecture, config fields, the SAELens class its loader must build)
OURS_TO_SAELENS = {
    "standard": ("standard", {}, "StandardSAE"),
    "standard_uncentred": ("standard", {"apply_b_dec_to_input": False}, "StandardSAE"),
    "topk": ("topk", {"k": K}, "TopKSAE"),
    "batchtopk": ("batchtopk", {"k": K}, "JumpReLUSAE"),  # written as its JumpReLU export
    "jumprelu": ("jumprelu", {}, "JumpReLUSAE"),
    "gated": ("gated", {}, "GatedSAE"),
    "transcoder": ("standard", TRANSCODER, "Transcoder"),
    "skip_transcoder": ("standard", {**TRANSCODER, "skip_connection": True}, "SkipTranscoder"),
    "jumprelu_transcoder": ("jumprelu", TRANSCODER, "JumpReLUTranscoder"),
    "jumprelu_skip_transcoder": (
        "jumprelu",
        {**TRANSCODER, "skip_connection": True},
        "JumpReLUSkipTranscoder",
    ),
}

# name -> (SAELens architecture, its config fields, extra job fields, (our architecture, skip))
SAELENS_TO_OURS = {
    "standard": ("standard", {}, {}, ("standard", False)),
    "standard_uncentred": ("standard", {"apply_b_dec_to_input": False}, {}, ("standard", False)),
    "topk": ("topk", {"k": K}, {}, ("topk", False)),
    # Its TopK ranks pre * ||W_dec_i|| and decodes codes / ||W_dec_i||: we fold the norms.
    "topk_rescaled": (
        "topk",
        {"k": K, "rescale_acts_by_decoder_norm": True},
        {},
        ("topk", False),
    ),
    "jumprelu": ("jumprelu", {}, {}, ("jumprelu", False)),
    "gated": ("gated", {}, {}, ("gated", False)),
    "transcoder": ("transcoder", TRANSCODER, {}, ("standard", False)),
    "skip_transcoder": ("skip_transcoder", TRANSCODER, {}, ("standard", True)),
    "jumprelu_transcoder": ("jumprelu_transcoder", TRANSCODER, {}, ("jumprelu", False)),
    "jumprelu_skip_transcoder": ("jumprelu_skip_transcoder", TRANSCODER, {}, ("jumprelu", True)),
    # Training SAEs exported by save_inference_model, as SAELens's trainer does at the end.
    # The TopK export folds the decoder norms into the weights (its cfg keeps
    # rescale_acts_by_decoder_norm=True, a no-op on unit-norm rows); BatchTopK becomes a
    # JumpReLU with its running threshold on every latent.
    "topk_training_export": ("topk", {"k": K}, {"training": True}, ("topk", False)),
    "batchtopk_training_export": (
        "batchtopk",
        {"k": K},
        {"training": True, "buffers": {"topk_threshold": 0.4}},
        ("jumprelu", False),
    ),
}

# name -> (trainer "<module>.<Class>" under dictionary_learning.trainers, its kwargs, extra
# job fields, our architecture, which of its outputs to compare with)
DICTIONARY_LEARNING = {
    "AutoEncoder": ("standard.StandardTrainer", {}, {}, "standard", "codes"),
    # The April-update trainer writes dict_class "AutoEncoder" for an AutoEncoderNew.
    "AutoEncoderNew": (
        "standard.StandardTrainerAprilUpdate",
        {},
        {"dict_class": "AutoEncoderNew"},
        "standard",
        "codes",
    ),
    "AutoEncoderTopK": ("top_k.TopKTrainer", {"k": K}, {}, "topk", "codes"),
    # Its inference threshold is not used by its default encode (use_threshold=False).
    "AutoEncoderTopK_with_threshold": (
        "top_k.TopKTrainer",
        {"k": K},
        {"threshold": 0.3},
        "topk",
        "codes",
    ),
    "BatchTopKSAE": (
        "batch_top_k.BatchTopKTrainer",
        {"k": K},
        {"threshold": 0.4},
        "jumprelu",
        "codes",
    ),
    # threshold -1 (never estimated: the trainer starts after threshold_start_step=1000).
    # Its default encode(use_threshold=True) then keeps relu(pre) > -1, i.e. every positive
    # pre-activation: dense ReLU codes no training step ever produced. We keep the batch-level
    # top-k it was trained with (its encode(use_threshold=False)); a deliberate divergence
    # from its default, not a converter bug, also documented in formats/dictionary_learning.py.
    "BatchTopKSAE_threshold_unset": (
        "batch_top_k.BatchTopKTrainer",
        {"k": K},
        {},
        "batchtopk",
        "codes_batch",
    ),
    "MatryoshkaBatchTopKSAE": (
        "matryoshka_batch_top_k.MatryoshkaBatchTopKTrainer",
        {"k": K, "group_fractions": [0.25, 0.75]},
        {"threshold": 0.4},
        "jumprelu",
        "codes",
    ),
    "JumpReluAutoEncoder": ("jumprelu.JumpReluTrainer", {}, {}, "jumprelu", "codes"),
    "GatedAutoEncoder": ("gdm.GatedSAETrainer", {}, {}, "gated", "codes"),
}


# ------------------------------------------------------------------ running the peers
def peer(name: str) -> Path:
    """The peer venv's python, creating the venv first if needed; skip if that fails."""
    try:
        seconds = install_peer(name)
    except (subprocess.CalledProcessError, OSError) as err:
        pytest.skip(
            f"the {name} peer virtualenv is missing and could not be created ({err}); it "
            f"needs PyPI access once: run `make crosscheck` or "
            f"`python benchmarks/compare.py --install-only` with network"
        )
    if seconds:
        print(f"created the {name} peer venv in {seconds:.0f} s")
    return peer_python(name)


def run_peer(name: str, script: str, job: dict, folder: Path) -> None:
    """Run ``peer_scripts/<script>`` on ``job`` with peer ``name``'s python."""
    python = peer(name)
    job_path = folder / "job.json"
    job_path.write_text(json.dumps(job, indent=1))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        TQDM_DISABLE="1",
    )
    proc = subprocess.run(
        [str(python), str(SCRIPTS / script), str(job_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
        timeout=900,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"


def randomised(architecture: str, **fields) -> torch.nn.Module:
    """One of our dictionaries with random weights, as :func:`randomise` in the peer scripts."""
    sae = create_dictionary(architecture, d_in=D, d_latent=F, **fields)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name == "log_threshold":
                param.copy_((torch.rand_like(param) * 0.6 + 0.05).log())
            else:
                param.copy_(torch.randn_like(param) * (0.1 if name == "r_mag" else 0.3))
    if architecture == "batchtopk":
        sae.train().forward_train(torch.randn(64, D))  # estimates the inference threshold
    return sae.eval()


def outputs(dictionary, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        codes = dictionary.encode(x)
        return {"codes": codes, "decoded": dictionary.decode(codes), "forward": dictionary(x)}


def peer_class(path: Path) -> str:
    with safe_open(str(path), "pt") as f:
        return f.metadata()["class"]


def assert_same(ours: dict, theirs: dict, pairs: dict[str, str]) -> None:
    for mine, their_name in pairs.items():
        torch.testing.assert_close(ours[mine], theirs[their_name], atol=ATOL, rtol=0)
    codes = theirs[pairs["codes"]]
    assert (codes != 0).any() and (codes == 0).any()  # a sparse code, not a degenerate one


@pytest.fixture(scope="module")
def x(tmp_path_factory) -> tuple[torch.Tensor, Path]:
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("x") / "x.safetensors"
    save_file({"x": torch.randn(32, D, generator=torch.Generator().manual_seed(0))}, str(path))
    return load_file(str(path))["x"], path


# ------------------------------------------------------------------ SAELens
@pytest.fixture(scope="module")
def saelens_run(tmp_path_factory, x) -> tuple[Path, dict]:
    """Our folders for SAELens to load, and SAELens's folders for us to read, in one run."""
    root = tmp_path_factory.mktemp("saelens")
    torch.manual_seed(1)
    ours = {}
    load = []
    for name, (architecture, fields, _) in OURS_TO_SAELENS.items():
        ours[name] = randomised(architecture, **fields)
        write_folder(ours[name], root / f"ours_{name}", format="saelens")
        load.append({"folder": str(root / f"ours_{name}"), "out": str(root / f"ours_{name}.out")})
    save = [
        {
            "architecture": architecture,
            "cfg": {"d_in": D, "d_sae": F, **cfg},
            "seed": seed,
            "folder": str(root / f"theirs_{name}"),
            "out": str(root / f"theirs_{name}.out"),
            **extra,
        }
        for seed, (name, (architecture, cfg, extra, _)) in enumerate(SAELENS_TO_OURS.items())
    ]
    run_peer("saelens", "saelens_side.py", {"x": str(x[1]), "load": load, "save": save}, root)
    return root, ours


@pytest.mark.parametrize("name", list(OURS_TO_SAELENS))
def test_saelens_loads_what_we_write(saelens_run, x, name):
    root, ours = saelens_run
    out = root / f"ours_{name}.out"
    assert peer_class(out) == OURS_TO_SAELENS[name][2]
    expected = outputs(ours[name].to_inference(), x[0])
    assert_same(expected, load_file(str(out)), {k: k for k in ("codes", "decoded", "forward")})


@pytest.mark.parametrize("name", list(SAELENS_TO_OURS))
def test_we_read_what_saelens_saves(saelens_run, x, name):
    root, _ = saelens_run
    ours = read_folder(root / f"theirs_{name}")
    architecture, skip = SAELENS_TO_OURS[name][3]
    assert (ours.architecture, ours.config.skip_connection) == (architecture, skip)
    theirs = load_file(str(root / f"theirs_{name}.out"))
    assert_same(outputs(ours, x[0]), theirs, {k: k for k in ("codes", "decoded", "forward")})


def test_saelens_topk_rescaling_really_changes_the_codes(saelens_run, x):
    """Guards the rescaled case against passing vacuously: its decoder norms are not 1."""
    root, _ = saelens_run
    weights = load_file(str(root / "theirs_topk_rescaled" / "sae_weights.safetensors"))
    norms = weights["W_dec"].norm(dim=-1)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=0.1)


# ------------------------------------------------------------------ dictionary_learning
@pytest.fixture(scope="module")
def dictionary_learning_run(tmp_path_factory, x) -> Path:
    root = tmp_path_factory.mktemp("dictionary_learning")
    save = [
        {
            "trainer": trainer,
            "kwargs": {"dict_size": F, **kwargs},
            "seed": seed,
            "folder": str(root / name),
            "out": str(root / f"{name}.out"),
            **extra,
        }
        for seed, (name, (trainer, kwargs, extra, _, _)) in enumerate(DICTIONARY_LEARNING.items())
    ]
    run_peer(
        "dictionary_learning", "dictionary_learning_side.py", {"x": str(x[1]), "save": save}, root
    )
    return root


@pytest.mark.parametrize("name", list(DICTIONARY_LEARNING))
def test_we_read_what_dictionary_learning_saves(dictionary_learning_run, x, name):
    folder = dictionary_learning_run / name / "trainer_0"  # trainSAE's layout
    assert sorted(p.name for p in folder.iterdir()) == ["ae.pt", "config.json"]
    ours = read_folder(folder)
    _, _, extra, architecture, codes_key = DICTIONARY_LEARNING[name]
    assert ours.architecture == architecture
    trainer_config = json.loads((folder / "config.json").read_text())["trainer"]
    if "dict_class" in extra:
        assert trainer_config["dict_class"] == "AutoEncoder"  # the mislabel we must see through
    if "threshold" in extra and architecture == "jumprelu":
        assert torch.allclose(ours.threshold, torch.tensor(extra["threshold"]))
    theirs = load_file(str(dictionary_learning_run / f"{name}.out"))
    decoded_key = "decoded_batch" if codes_key == "codes_batch" else "decoded"
    assert_same(outputs(ours, x[0]), theirs, {"codes": codes_key, "decoded": decoded_key})


# ------------------------------------------------------------------ SAELens's downstream metrics
DOWNSTREAM_SITE = "layers.1.resid_post"  # SAELens's blocks.1.hook_resid_post
CONTEXTS, BATCH, CONTEXT = 12, 4, 16
# Ours -> SAELens's names (run_evals' model_performance/behavior_preservation groups).
SAELENS_NAMES = {
    "ce_clean": "ce_loss_without_sae",
    "ce_spliced": "ce_loss_with_sae",
    "ce_zero_ablation": "ce_loss_with_ablation",
    "ce_loss_recovered": "ce_loss_score",
    "kl_divergence": "kl_div_with_sae",
    "kl_zero_ablation": "kl_div_with_ablation",
    "kl_div_score": "kl_div_score",
}


def lossy_topk(d: int) -> torch.nn.Module:
    """A fixed TopK SAE that keeps about half of each activation: codes near [x+, x-]."""
    sae = create_dictionary("topk", d_in=d, d_latent=2 * d, k=d // 2)
    generator = torch.Generator().manual_seed(2)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(
            torch.cat([eye, -eye], 1) + 0.05 * torch.randn(d, 2 * d, generator=generator)
        )
        sae.W_dec.copy_(
            torch.cat([eye, -eye], 0) + 0.05 * torch.randn(2 * d, d, generator=generator)
        )
        sae.b_enc.copy_(0.01 * torch.randn(2 * d, generator=generator))
        sae.b_dec.copy_(0.01 * torch.randn(d, generator=generator))
    sae.config.provenance.site = DOWNSTREAM_SITE
    return sae.eval()


@pytest.fixture(scope="module")
def downstream_run(tmp_path_factory) -> tuple[dict, Backbone, torch.nn.Module, torch.Tensor]:
    """SAELens's run_evals on our tiny GPT-2, SAE and tokens: its results and our inputs."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("saelens_downstream")
    model, tokenizer = lm_helpers.trained_gpt2(), lm_helpers.word_tokenizer()
    model.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    sae = lossy_topk(model.config.n_embd)
    write_folder(sae, root / "sae", format="saelens")
    tokens = lm_helpers.documents(CONTEXTS, CONTEXT, seed=1000)
    save_file({"tokens": tokens}, str(root / "tokens.safetensors"))
    job = {
        "model": str(root / "gpt2"),
        "sae": str(root / "sae"),
        "tokens": str(root / "tokens.safetensors"),
        "batch_size": BATCH,
        "exclude_special_tokens": [True, False],
        "out": str(root / "downstream.json"),
    }
    run_peer("saelens", "saelens_side.py", {"downstream": job}, root)
    theirs = json.loads((root / "downstream.json").read_text())
    return theirs, Backbone(model, tokenizer), sae, tokens


def ours(backbone, sae, tokens, **kwargs) -> dict[str, float]:
    ce, kl = CrossEntropyLossRecovered(), SplicedKLDivergence()
    for batch in tokens.split(BATCH):
        inputs = {"input_ids": batch}
        splice_evaluation(
            backbone, sae, DOWNSTREAM_SITE, inputs, ce_metric=ce, kl_metric=kl, **kwargs
        )
    return {name: float(v) for name, v in {**ce.compute_all(), **kl.compute_all()}.items()}


@pytest.mark.parametrize("exclude", [True, False])
def test_downstream_metrics_equal_saelens_run_evals(downstream_run, exclude):
    theirs, backbone, sae, tokens = downstream_run
    assert theirs["hook_name"] == "blocks.1.hook_resid_post"
    assert theirs["special_token_ids"] == [lm_helpers.BOS, lm_helpers.EOS]
    mine = ours(backbone, sae, tokens, exclude_special_tokens=exclude)
    expected = theirs[f"exclude_{str(exclude).lower()}"]
    print(f"\nexclude_special_tokens={exclude}")
    for name, their_name in SAELENS_NAMES.items():
        print(f"  {name:18s} ours {mine[name]:.6f}  SAELens {expected[their_name]:.6f}")
    assert 0.5 < mine["ce_loss_recovered"] < 1.0  # a lossy SAE: the score is informative
    for name, their_name in SAELENS_NAMES.items():
        assert mine[name] == pytest.approx(expected[their_name], rel=1e-4, abs=1e-5), name


def test_the_old_convention_does_not_match_saelens(downstream_run):
    """The cross-check can tell conventions apart: the previous default fails it."""
    theirs, backbone, sae, tokens = downstream_run
    old = ours(backbone, sae, tokens, convention="special_tokens_clean")
    expected = theirs["exclude_true"]
    print(
        f"\nspecial_tokens_clean: ce_loss_recovered {old['ce_loss_recovered']:.6f}, "
        f"ce_zero_ablation {old['ce_zero_ablation']:.6f}"
    )
    assert old["ce_zero_ablation"] != pytest.approx(expected["ce_loss_with_ablation"], rel=1e-2)
    assert old["ce_clean"] != pytest.approx(expected["ce_loss_without_sae"], rel=1e-2)
