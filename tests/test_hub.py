"""Model cards and Hub publishing, against a loopback Hub (tests/hub_server.py): nothing leaves 127.0.0.1.

The Hub client reads HF_ENDPOINT (and HF_HUB_OFFLINE) once, when huggingface_hub is imported, and this pytest process
may have imported it already; so every Hub client call runs in a subprocess whose environment points at the loopback
server, and the server runs here, in a thread, for the length of one test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

try:
    from .hub_server import HubServer
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
CLIENT_TIMEOUT = 120  # seconds for one client subprocess; a hang fails the test instead of the run
REPO = "test-org/daps-test"


def _real_model_importable() -> bool:
    try:
        from tokenizer import DapsConfig, DapsModel  # noqa: F401

        DapsConfig.from_preset("tiny")
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------------- fixtures
CONFIG = {
    "model_type": "daps", "architectures": ["DapsModel"], "image_size": 28, "num_channels": 1, "patch_size": 7,
    "num_tokens": 8, "codebook_size": 256, "hidden_size": 64, "likelihood": "bernoulli",
    "encoder_type": "autoregressive", "quantizer": "categorical", "decoder_type": "mlp",
}
METRICS = {
    "method": "daps", "dataset": "mnist-5k", "split": "validation", "num_images": 500,
    "psnr": 18.234567890123456, "ssim": 0.7312345678901234, "beta_elbo_nats": -46.54321098765432,
    "neg_elbo_bits": 67.14159265358979, "bits_per_image": 64.0, "code_usage": 0.83984375,
    "code_perplexity": 187.25390625, "fid": 12.3456789, "steps": 2000, "wall_clock_seconds": 412.5, "beta": 1.0,
    "train_command": "daps train --dataset mnist-5k --method daps --max-steps 2000",
}


def write_fake_folder(folder: Path, config: dict | None = None, metrics: dict | None = None) -> Path:
    """A folder shaped like `daps train`'s output, with small fake weights (no model classes needed)."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or CONFIG, indent=2))
    generator = torch.Generator().manual_seed(0)
    save_file({"encoder.weight": torch.randn(64, 49, generator=generator),
               "decoder.bias": torch.randn(784, generator=generator)}, str(folder / "model.safetensors"))
    if metrics is not False:
        (folder / "metrics.json").write_text(json.dumps(metrics or METRICS, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "DapsImageProcessor", "image_size": 28, "num_channels": 1}, indent=2))
    (folder / "modeling_daps.py").write_text("# the modelling code shipped for trust_remote_code\n")
    Image.fromarray((np.arange(56 * 28) % 256).astype("uint8").reshape(56, 28)).save(folder / "reconstructions.png")
    (folder / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    (folder / "checkpoints" / "step-3").mkdir(parents=True, exist_ok=True)
    (folder / "checkpoints" / "step-3" / "optimizer.bin").write_bytes(b"\0" * 1024)
    return folder


@pytest.fixture
def fake_folder(tmp_path) -> Path:
    return write_fake_folder(tmp_path / "daps-mnist-5k")


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


def run_client(hub: HubServer, code: str, home: Path, *, offline: bool = False, **extra_env: str) -> dict:
    """Run `code` in a fresh Python whose huggingface_hub talks to `hub` only; it prints one JSON line last."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(
        HF_ENDPOINT=hub.endpoint, HF_HOME=str(home), HF_TOKEN="hf_loopback_test_token",
        HF_HUB_OFFLINE="1" if offline else "0", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_ETAG_TIMEOUT="10", HF_HUB_DOWNLOAD_TIMEOUT="10",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), **extra_env,
    )
    guard = textwrap.dedent("""
        import json, os
        from huggingface_hub import constants
        assert constants.ENDPOINT == os.environ["HF_ENDPOINT"], constants.ENDPOINT  # never the real Hub
    """)
    result = subprocess.run([sys.executable, "-c", guard + textwrap.dedent(code)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, f"client failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def tree(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---\n", 2)[1])


def model_index_metrics(metadata: dict) -> dict:
    (entry,) = metadata["model-index"]
    (result,) = entry["results"]
    return {metric["type"]: metric["value"] for metric in result["metrics"]}


# ---------------------------------------------------------------------------------------------------- the card
def test_card_metadata_carries_the_exact_metrics(fake_folder):
    from huggingface_hub import ModelCard

    from hub_cards import build_model_card, write_model_card

    card = build_model_card(fake_folder, repo_id=REPO)
    metadata = front_matter(str(card))
    assert metadata["library_name"] == "transformers"
    assert metadata["license"] == "apache-2.0"
    assert {"image-tokenizer", "discrete-vae", "daps"} <= set(metadata["tags"])
    assert "datasets" not in metadata  # mnist-5k is built in, not a Hub dataset
    assert metadata["model-index"][0]["name"] == "daps-test"
    result = metadata["model-index"][0]["results"][0]
    assert result["dataset"]["type"] == "mnist-5k" and result["dataset"]["split"] == "validation"
    assert model_index_metrics(metadata) == {
        "psnr": METRICS["psnr"], "ssim": METRICS["ssim"], "beta-elbo": METRICS["beta_elbo_nats"],
        "neg-elbo-bits": METRICS["neg_elbo_bits"], "bits-per-image": METRICS["bits_per_image"],
        "code-usage": METRICS["code_usage"], "code-perplexity": METRICS["code_perplexity"], "fid": METRICS["fid"],
    }

    path = write_model_card(fake_folder, repo_id=REPO)
    assert path == fake_folder / "README.md"
    loaded = ModelCard.load(path)  # huggingface_hub's own parser accepts it, model-index included
    values = {result.metric_type: result.metric_value for result in loaded.data.eval_results}
    assert values["psnr"] == METRICS["psnr"] and values["fid"] == METRICS["fid"]
    body = loaded.text
    assert METRICS["train_command"] in body
    assert "](reconstructions.png)" in body
    assert f'AutoModel.from_pretrained("{REPO}", trust_remote_code=True)' in body
    assert "model.encode(pixel_values).codes" in body


@pytest.mark.parametrize("image_size, channels, tokens, vocab, bits, ratio", [
    (28, 1, 8, 256, "64", "98×"),           # 6,272 raw bits / 64
    (32, 3, 64, 512, "576", "42.7×"),       # 24,576 / 576 = 42.67
    (32, 3, 4, 1000, "39.86", "616.5×"),    # 4 · log2(1000) = 39.86 bits (not stored anywhere)
])
def test_card_states_bits_and_compression_ratio(tmp_path, image_size, channels, tokens, vocab, bits, ratio):
    from hub_cards import build_model_card

    config = {**CONFIG, "image_size": image_size, "num_channels": channels, "num_tokens": tokens,
              "codebook_size": vocab}
    expected_bits = tokens * math.log2(vocab)
    folder = write_fake_folder(tmp_path / "f", config=config, metrics={**METRICS, "bits_per_image": expected_bits})
    text = build_model_card(folder).text
    raw = f"{image_size * image_size * channels * 8:,}"
    assert f"| bits per image (L · log2 V) | {bits} |" in text
    assert f"| raw 8-bit pixels (H · W · C · 8) | {raw} bits |" in text
    assert f"| compression ratio | {ratio} |" in text
    assert f"that is {bits} bits, {ratio} fewer than the {raw} bits" in text


def test_card_for_a_quantiser_baseline_has_no_elbo_and_names_hub_datasets(tmp_path):
    from hub_cards import build_model_card

    metrics = {**METRICS, "method": "vq", "dataset": "uoft-cs/cifar10", "split": "test", "beta_elbo_nats": None,
               "neg_elbo_bits": None}
    del metrics["fid"]
    folder = write_fake_folder(tmp_path / "vq", config={**CONFIG, "quantizer": "vq", "encoder_type": "parallel"},
                               metrics=metrics)
    (folder / "reconstructions.png").unlink()
    card = build_model_card(folder, repo_id="org/vq")
    metadata = front_matter(str(card))
    assert metadata["datasets"] == ["uoft-cs/cifar10"]
    assert "vq" in metadata["tags"]
    values = model_index_metrics(metadata)
    assert "beta-elbo" not in values and "neg-elbo-bits" not in values and "fid" not in values
    assert values["psnr"] == metrics["psnr"]
    assert metadata["model-index"][0]["results"][0]["dataset"]["split"] == "test"
    assert "reconstructions.png" not in card.text
    assert "No ELBO" in card.text


def test_card_without_metrics_and_bad_folders(tmp_path):
    from hub_cards import build_model_card

    folder = write_fake_folder(tmp_path / "bare", metrics=False)
    card = build_model_card(folder)
    assert "model-index" not in front_matter(str(card))
    assert "No held-out metrics" in card.text

    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_model_card(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_model_card(tmp_path / "empty")
    (folder / "config.json").write_text(json.dumps({**CONFIG, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type"):
        build_model_card(folder)


def test_push_refuses_what_is_not_a_saved_tokenizer(tmp_path, fake_folder):
    from training.hub import push_to_hub

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="config.json, model.safetensors.*checkpoints"):
        push_to_hub(tmp_path / "run", REPO)
    (fake_folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        push_to_hub(fake_folder, REPO)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        push_to_hub(tmp_path / "nowhere", REPO)
    folder = write_fake_folder(tmp_path / "ok")
    with pytest.raises(ValueError, match="repo_id"):
        push_to_hub(folder, "no-namespace")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_other.DapsModel"}}))
    with pytest.raises(FileNotFoundError, match="modeling_other.py"):
        push_to_hub(folder, REPO)


# ---------------------------------------------------------------------------------------------------- push and pull
# huggingface_hub uploads a folder through its streamed multi-commit pipeline when hf_xet is installed, and through one
# create_commit otherwise (HF_HUB_DISABLE_XET=1): both must work against the same routes.
@pytest.mark.parametrize("disable_xet", ["0", "1"], ids=["pipelined-upload", "single-commit-upload"])
def test_push_then_pull_round_trip_and_offline_cache(hub, fake_folder, tmp_path, disable_xet):
    pushed = run_client(hub, f"""
        import contextlib, io
        from training.cli import main
        from training.hub import push_to_hub
        first = push_to_hub({str(fake_folder)!r}, {REPO!r}, private=True)
        again = push_to_hub({str(fake_folder)!r}, {REPO!r})           # nothing changed: no new commit
        with contextlib.redirect_stdout(io.StringIO()) as out:        # `daps push DIR --repo-id ... --revision dev`
            assert main(["push", {str(fake_folder)!r}, "--repo-id", {REPO!r}, "--revision", "dev"]) == 0
        dev = json.loads(out.getvalue())["url"]
        print(json.dumps({{"first": first, "again": again, "dev": dev}}))
    """, tmp_path / "push-home", HF_HUB_DISABLE_XET=disable_xet)
    assert pushed["first"].startswith(f"{hub.endpoint}/{REPO}/commit/")
    assert pushed["again"] == pushed["first"]
    assert pushed["dev"].startswith(f"{hub.endpoint}/{REPO}/commit/")
    assert set(hub.branches(REPO)) == {"main", "dev"} and hub.is_private(REPO)

    local = tree(fake_folder)  # README.md (the card) written by the push
    shipped = {path: data for path, data in local.items() if not path.startswith("checkpoints/")}
    assert {"README.md", "config.json", "model.safetensors", "metrics.json", "preprocessor_config.json",
            "modeling_daps.py", "reconstructions.png", "log.jsonl"} <= set(shipped)
    remote = hub.files(REPO)
    assert {path: data for path, data in remote.items() if path != ".gitattributes"} == shipped
    assert hub.files(REPO, "dev") == remote
    assert f"{REPO}" in shipped["README.md"].decode() and "model-index" in shipped["README.md"].decode()
    assert hub.unknown_requests == []

    home = tmp_path / "pull-home"
    pulled = run_client(hub, f"""
        from huggingface_hub import snapshot_download
        print(json.dumps({{"path": snapshot_download({REPO!r})}}))
    """, home)
    snapshot = Path(pulled["path"])
    assert snapshot.is_relative_to(home)
    downloaded = tree(snapshot)
    assert downloaded.pop(".gitattributes")
    assert downloaded == shipped  # every file, byte for byte
    assert hub.unknown_requests == []

    seen = len(hub.requests)
    offline = run_client(hub, f"""
        from huggingface_hub import hf_hub_download, snapshot_download
        path = snapshot_download({REPO!r})
        config = json.load(open(hf_hub_download({REPO!r}, "config.json")))
        print(json.dumps({{"path": path, "num_tokens": config["num_tokens"]}}))
    """, home, offline=True)
    assert offline == {"path": pulled["path"], "num_tokens": CONFIG["num_tokens"]}
    assert len(hub.requests) == seen  # the cache alone answered


@pytest.mark.skipif(not _real_model_importable(), reason="tokenizer.DapsModel / DapsConfig.from_preset not importable")
def test_real_tiny_model_loads_from_the_hub_with_remote_code_and_offline(hub, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    import tokenizer
    from tokenizer import DapsConfig, DapsModel

    torch.manual_seed(0)
    model = DapsModel(DapsConfig.from_preset("tiny")).eval()
    folder = tmp_path / "daps-tiny"
    model.save_pretrained(folder)
    if getattr(tokenizer, "DapsImageProcessor", None) is not None:
        tokenizer.DapsImageProcessor(image_size=model.config.image_size,
                                     num_channels=model.config.num_channels).save_pretrained(folder)
    low = 0.0 if model.config.likelihood == "bernoulli" else -1.0
    pixels = torch.rand(4, model.config.num_channels, model.config.image_size, model.config.image_size,
                        generator=torch.Generator().manual_seed(1)) * (1 - low) + low
    with torch.no_grad():
        expected = model.encode(pixels).codes
    save_file({"pixel_values": pixels}, str(tmp_path / "pixels.safetensors"))
    repo = "test-org/daps-tiny"

    run_client(hub, f"""
        from training.hub import push_to_hub
        print(json.dumps({{"url": push_to_hub({str(folder)!r}, {repo!r})}}))
    """, tmp_path / "push-home")
    assert {"config.json", "model.safetensors", "configuration_daps.py", "modeling_daps.py",
            "README.md"} <= set(hub.files(repo))

    with_processor = (folder / "preprocessor_config.json").is_file()
    load = f"""
        import sys, torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoImageProcessor, AutoModel
        model = AutoModel.from_pretrained({repo!r}, trust_remote_code=True).eval()
        processor = None
        if {with_processor!r}:
            processor = type(AutoImageProcessor.from_pretrained({repo!r}, trust_remote_code=True)).__name__
        assert "tokenizer" not in sys.modules  # the Hub's copy of the code, not the installed package
        with torch.no_grad():
            codes = model.encode(load_file({str(tmp_path / "pixels.safetensors")!r})["pixel_values"]).codes
        save_file({{"codes": codes.contiguous()}}, OUT)
        print(json.dumps({{"module": type(model).__module__, "processor": processor}}))
    """
    home = tmp_path / "load-home"
    for offline in (False, True):
        out = tmp_path / f"codes-{offline}.safetensors"
        seen = len(hub.requests)
        result = run_client(hub, f"OUT = {str(out)!r}\n" + textwrap.dedent(load), home, offline=offline)
        assert "transformers_modules" in result["module"]
        assert result["processor"] == ("DapsImageProcessor" if with_processor else None)
        assert torch.equal(load_file(str(out))["codes"], expected)
        if offline:
            assert len(hub.requests) == seen
    assert hub.unknown_requests == []
