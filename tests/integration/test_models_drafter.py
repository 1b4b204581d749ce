"""A catalog model's MTP drafter: pulled beside the model from a Hub-like host, shared by the quants of a variant,
removed with the last of them, and served with the model (``engine.drafter`` unset -> the catalog's drafter).

Real parts: nginx serving the Hugging Face resolve layout (the same helper as test_models_pull), the pull path,
the engine loading the tiny Gemma 4 model with the tiny drafter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgert.catalog import Catalog, load_catalog
from edgert.cli import exitcodes
from edgert.cli.models import app
from edgert.errors import ConfigError, ModelFileError
from edgert.pull import pull_drafter
from edgert.serving.runtime import open_runtime
from edgert.settings import EngineSettings, Settings
from tests.integration.test_models_pull import COMMIT, HF_FILE, HF_REPO, Nginx, _free_port, _sha

TINY_DRAFTER = Path(__file__).parents[1] / "fixtures" / "tiny-gemma4-assistant.gguf"
DRAFTER_FILE = "mtp-tiny-gemma4.gguf"


@dataclass
class Hub:
    nginx: Nginx
    catalog_path: Path
    state_dir: Path
    tiny: bytes
    drafter: bytes

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def catalog(self) -> Catalog:
        return load_catalog(self.catalog_path)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``edgert models`` in a subprocess: HF_ENDPOINT is read at import time."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "EDGERT_"))}
        environ.update(
            EDGERT_STATE_DIR=str(self.state_dir),
            EDGERT_CATALOG=str(self.catalog_path),
            HF_ENDPOINT=self.nginx.base_url,
            HF_HOME=str(self.state_dir / "hf-home"),
        )
        return subprocess.run(
            [sys.executable, "-m", "edgert.cli.models", *args],
            check=False,
            env=environ,
            capture_output=True,
            text=True,
            timeout=120,
        )


def _entry(model_id: str, tiny: bytes, drafter_source: str, drafter: bytes, *, pinned: bool = True) -> str:
    hf = f'kind = "huggingface"\nrepo = "{HF_REPO}"\nfile = "{HF_FILE}"\nrevision = "{COMMIT}"'
    pin = f'sha256 = "{_sha(drafter)}"' if pinned else ""
    return f"""
[[model]]
id = "{model_id}"
family = "gemma4"
architecture = "gemma4"
quant = "F16"
size_bytes = {len(tiny)}
sha256 = "{_sha(tiny)}"
context_length = 8192
ram_mib = 64
kv_mib_per_1k_ctx = 1.0
[model.source]
{hf}
[model.drafter]
size_bytes = {len(drafter)}
{pin}
[model.drafter.source]
{drafter_source}
"""


@pytest.fixture
def hub(tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    tiny, drafter = tiny_gguf.read_bytes(), TINY_DRAFTER.read_bytes()
    nginx = Nginx(tmp_path / "nginx", port=_free_port(), tls_port=_free_port())
    nginx.workdir.mkdir()
    nginx.make_certificate()
    monkeypatch.setenv("SSL_CERT_FILE", str(nginx.cert))
    nginx.add_hf_file(HF_REPO, COMMIT, HF_FILE, tiny)
    nginx.add_hf_file(HF_REPO, COMMIT, DRAFTER_FILE, drafter)
    nginx.add_file("files/not-a-drafter.gguf", tiny)
    hf_drafter = f'kind = "huggingface"\nrepo = "{HF_REPO}"\nfile = "{DRAFTER_FILE}"\nrevision = "{COMMIT}"'
    wrong = f'kind = "url"\nurl = "{nginx.base_url}/files/not-a-drafter.gguf"'
    catalog_path = tmp_path / "models.toml"
    catalog_path.write_text(
        _entry("tiny-mtp:f16", tiny, hf_drafter, drafter)
        + _entry("tiny-mtp:q8_0", tiny, hf_drafter, drafter)
        + _entry("tiny-mtp-wrong:f16", tiny, wrong, tiny, pinned=False),
        encoding="utf-8",
    )
    monkeypatch.setenv("EDGERT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("EDGERT_CATALOG", str(catalog_path))
    monkeypatch.delenv("EDGERT_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    nginx.start()
    try:
        yield Hub(nginx, catalog_path, tmp_path / "state", tiny, drafter)
    finally:
        nginx.stop()


def test_pull_drafter_installs_the_variants_drafter_and_quants_share_it(hub: Hub) -> None:
    result = pull_drafter(hub.catalog.get("tiny-mtp:f16"), hub.models_dir, hf_endpoint=hub.nginx.base_url)
    assert result is not None and result.changed
    assert result.path == hub.models_dir / "tiny-mtp.drafter.gguf"
    assert result.path.read_bytes() == hub.drafter and result.sha256 == _sha(hub.drafter)
    again = pull_drafter(hub.catalog.get("tiny-mtp:q8_0"), hub.models_dir, hf_endpoint=hub.nginx.base_url)
    assert again is not None and not again.changed and again.path == result.path


def test_a_language_model_where_the_drafter_belongs_is_refused(hub: Hub) -> None:
    with pytest.raises(ModelFileError, match="not a Gemma 4 MTP drafter"):
        pull_drafter(hub.catalog.get("tiny-mtp-wrong:f16"), hub.models_dir)
    assert not (hub.models_dir / "tiny-mtp-wrong.drafter.gguf").exists()
    assert not (hub.models_dir / "tiny-mtp-wrong.drafter.gguf.part").exists()


def test_cli_pull_fetches_the_drafter_serve_uses_it_rm_removes_it_with_the_last_quant(hub: Hub) -> None:
    done = hub.cli("pull", "tiny-mtp:f16")
    assert done.returncode == exitcodes.OK, done.stderr
    drafter = hub.models_dir / "tiny-mtp.drafter.gguf"
    assert done.stdout.splitlines()[1].startswith(f"installed the drafter of tiny-mtp:f16: {drafter}")
    assert drafter.read_bytes() == hub.drafter

    settings = Settings(state_dir=hub.state_dir, catalog=hub.catalog_path, engine=EngineSettings(n_threads=1))
    runtime = open_runtime(settings, "tiny-mtp:f16")
    try:
        assert runtime.backend.can_draft  # engine.drafter unset: the catalog model's own drafter
    finally:
        runtime.close()
    off = settings.model_copy(update={"engine": EngineSettings(n_threads=1, speculative="off")})
    runtime = open_runtime(off, "tiny-mtp:f16")
    try:
        assert not runtime.backend.can_draft
    finally:
        runtime.close()

    runner = CliRunner()
    verified = runner.invoke(app, ["verify", "tiny-mtp:f16"])
    assert verified.exit_code == exitcodes.OK, verified.output
    assert f"ok: {drafter}; MTP drafter; sha256 {_sha(hub.drafter)} (matches the catalog)" in verified.stdout
    drafter.write_bytes(hub.drafter[:-1] + bytes([hub.drafter[-1] ^ 1]))  # one flipped bit
    assert runner.invoke(app, ["verify", "tiny-mtp:f16"]).exit_code != exitcodes.OK
    drafter.write_bytes(hub.drafter)

    (hub.models_dir / "tiny-mtp.q8_0.gguf").write_bytes(hub.tiny)  # the other quant, installed by hand
    assert runner.invoke(app, ["rm", "tiny-mtp:f16"]).exit_code == exitcodes.OK
    assert drafter.is_file()  # the q8_0 still uses it
    removed = runner.invoke(app, ["rm", "tiny-mtp:q8_0"])
    assert removed.stdout == f"removed {hub.models_dir / 'tiny-mtp.q8_0.gguf'}\nremoved {drafter}\n"


def test_cli_pull_no_drafter_skips_it(hub: Hub) -> None:
    done = hub.cli("pull", "tiny-mtp:f16", "--no-drafter")
    assert done.returncode == exitcodes.OK, done.stderr
    assert done.stdout.count("\n") == 1
    assert not (hub.models_dir / "tiny-mtp.drafter.gguf").exists()


def test_quants_of_a_variant_must_name_the_same_drafter(hub: Hub, tiny_gguf: Path) -> None:
    tiny = tiny_gguf.read_bytes()
    source = f'kind = "url"\nurl = "{hub.nginx.base_url}/x.gguf"'
    text = _entry("v:f16", tiny, source, tiny) + _entry("v:q8_0", tiny, source, tiny + b"x")
    bad = hub.catalog_path.with_name("bad.toml")
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"v:f16 and v:q8_0 share v\.drafter\.gguf but describe different drafters"):
        load_catalog(bad)


def test_the_packaged_catalog_pins_the_gemma4_drafters() -> None:
    catalog = load_catalog()
    e2b, e4b = catalog.get("gemma-4-e2b-it:q4_k_m"), catalog.get("gemma-4-e4b-it:q8_0")
    assert e2b.drafter is not None and e2b.drafter.sha256 is not None and e2b.drafter.size_bytes == 97817664
    assert e4b.drafter is not None and e4b.drafter.sha256 is not None and e4b.drafter.size_bytes == 98653248
    assert catalog.get("gemma-3-270m:q4_k_m").drafter is None
