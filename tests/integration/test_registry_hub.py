"""``edgert registry publish --hf-repo``: the site uploaded with huggingface_hub to a local Hub host,
then read back by the real device client from the host's ``resolve`` URLs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
from typer.testing import CliRunner

from edgert.cli.registry import app
from edgert.registry import hub
from edgert.registry.repository import Registry
from edgert.update import download
from edgert.update.manifest import model_target_path
from edgert.update.registry import RegistryClient
from tests.integration.http_host import free_port
from tests.integration.hub_host import HubHost
from tests.integration.update_support import MODEL_ID, make_variant

TOKEN = "hf_local_test_token_0123456789"
REPO = "acme/fleet-registry"
runner = CliRunner()
# huggingface_hub 2.4's LFS PUT passes data= to httpx2, which deprecates it (their warning, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


@pytest.fixture
def hub_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubHost]:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # The local host speaks Git LFS, not Xet (the documented switch, read by huggingface_hub at call time).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    with HubHost(TOKEN) as host:
        yield host


def publish(reg: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["publish", "-d", str(reg), *args])
    return result.exit_code, result.stdout, result.stderr


def site_bytes(site: Path) -> dict[str, bytes]:
    return {p.relative_to(site).as_posix(): p.read_bytes() for p in hub.site_files(site)}


def test_publish_uploads_the_site_and_a_device_updates_from_the_hub(
    tmp_path: Path, tiny_gguf: Path, hub_host: HubHost
) -> None:
    registry = Registry.init(tmp_path / "reg")
    registry.add(tiny_gguf, model_id=MODEL_ID, version="1.0.0")
    registry.promote(MODEL_ID, "1.0.0", channel="stable", rollout=100)

    code, out, err = publish(tmp_path / "reg", "--hf-repo", REPO, "--hf-endpoint", hub_host.url)
    assert code == 0, err
    resolve = f"{hub_host.url}/{REPO}/resolve/main"
    assert f"devices: update.registry_url = {resolve}" in out
    assert TOKEN not in out + err

    # Byte-identical, the model as an LFS object, everything in one commit, uploaded before it.
    assert hub_host.files(REPO) == site_bytes(registry.repo_dir)
    ((_, _, committed),) = hub_host.repos[REPO].commits
    assert committed[-1] == "metadata/timestamp.json"
    assert committed.index("metadata/root.json") > max(i for i, p in enumerate(committed) if p.startswith("targets/"))
    gguf = next(p for p in committed if p.endswith(".model.gguf"))
    assert hub_host.repos[REPO].branches["main"][gguf].lfs
    puts = [i for i, r in enumerate(hub_host.requests) if r.startswith("PUT /lfs/")]
    commit = next(i for i, r in enumerate(hub_host.requests) if "/commit/" in r)
    assert puts and max(puts) < commit

    # A device reads the registry from the Hub's resolve URLs, TUF-verified, and downloads the model
    # (following the 302 to the LFS object, resumable with Range).
    client = RegistryClient(
        cache_dir=tmp_path / "device" / "tuf", registry_url=resolve, trusted_root=registry.metadata_dir / "1.root.json"
    )
    client.refresh()
    assert client.channels().channels["stable"].version == "1.0.0"
    target = client.target(model_target_path(MODEL_ID, "1.0.0"))
    part = tmp_path / "device" / "model.gguf.part"
    part.write_bytes(tiny_gguf.read_bytes()[:1000])  # an earlier attempt: the resume asks for a Range
    job = download.Fetch(f"{resolve}/targets/{target.url_path}", part, target.length, target.hashes)
    with download.client(30) as http:
        fetched = download.fetch(http, job)
    assert fetched.resumed_from == 1000
    assert part.read_bytes() == tiny_gguf.read_bytes()


def test_a_second_publish_sends_only_what_changed(tmp_path: Path, tiny_gguf: Path, hub_host: HubHost) -> None:
    registry = Registry.init(tmp_path / "reg")
    registry.add(tiny_gguf, model_id=MODEL_ID, version="1.0.0")
    registry.promote(MODEL_ID, "1.0.0", channel="stable", rollout=100)
    assert publish(tmp_path / "reg", "--hf-repo", REPO, "--hf-endpoint", hub_host.url)[0] == 0
    uploads = sum(r.startswith("PUT /lfs/") for r in hub_host.requests)

    registry.add(make_variant(tiny_gguf, tmp_path / "v2.gguf", general_name="v2"), model_id=MODEL_ID, version="2.0.0")
    registry.promote(MODEL_ID, "2.0.0", channel="stable", rollout=100)
    code, _, err = publish(tmp_path / "reg", "--hf-repo", REPO, "--hf-endpoint", hub_host.url)
    assert code == 0, err

    assert hub_host.files(REPO) == site_bytes(registry.repo_dir)
    assert sum(r.startswith("PUT /lfs/") for r in hub_host.requests) == uploads + 1  # only the new model
    _, _, second = hub_host.repos[REPO].commits[-1]
    assert not any("/1.0.0/" in path for path in second)  # unchanged files are skipped
    assert "metadata/1.root.json" not in second
    assert second[-1] == "metadata/timestamp.json"


def test_publish_to_a_branch(tmp_path: Path, tiny_gguf: Path, hub_host: HubHost) -> None:
    registry = Registry.init(tmp_path / "reg")
    registry.add(tiny_gguf, model_id=MODEL_ID, version="1.0.0")
    args = ("--hf-repo", REPO, "--hf-endpoint", hub_host.url, "--hf-revision", "staging")
    code, out, err = publish(tmp_path / "reg", *args)
    assert code == 0, err
    assert f"{hub_host.url}/{REPO}/resolve/staging" in out
    assert hub_host.files(REPO, "staging") == site_bytes(registry.repo_dir)
    assert hub_host.files(REPO, "main") == {}


def test_a_bad_token_is_a_clear_error_and_is_never_printed(
    tmp_path: Path, tiny_gguf: Path, hub_host: HubHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    Registry.init(tmp_path / "reg").add(tiny_gguf, model_id=MODEL_ID, version="1.0.0")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_secret")
    code, out, err = publish(tmp_path / "reg", "--hf-repo", REPO, "--hf-endpoint", hub_host.url)
    assert code == 1
    assert err.startswith("error: ") and "refused the credentials (HTTP 401)" in err and "HF_TOKEN" in err
    assert "hf_wrong_token_secret" not in out + err
    assert "published targets v1" in out  # the local publication stands; run publish again to upload


def test_an_unreachable_hub_is_a_clear_error(tmp_path: Path, tiny_gguf: Path, hub_host: HubHost) -> None:
    Registry.init(tmp_path / "reg").add(tiny_gguf, model_id=MODEL_ID, version="1.0.0")
    code, _, err = publish(tmp_path / "reg", "--hf-repo", REPO, "--hf-endpoint", f"http://127.0.0.1:{free_port()}")
    assert code == 1
    assert "cannot reach acme/fleet-registry" in err and "--hf-endpoint" in err
    assert TOKEN not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--hf-repo", REPO, "--hf-repo-type", "space"), "--hf-repo-type must be one of model, dataset"),
        (("--hf-repo", "acme/bad repo name!"), "acme/bad repo name!"),
    ],
)
def test_bad_hub_options_are_one_line_errors(
    tmp_path: Path, tiny_gguf: Path, hub_host: HubHost, args: tuple[str, ...], message: str
) -> None:
    Registry.init(tmp_path / "reg").add(tiny_gguf, model_id=MODEL_ID, version="1.0.0")
    code, _, err = publish(tmp_path / "reg", *args, "--hf-endpoint", hub_host.url)
    assert code == 1
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err
