"""`tarq remote quantize` against a real `tarq serve` (embedded): a local folder is uploaded, quantized with
calibration clips, followed and downloaded; refusals are one line naming the server's reason."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.service.conftest import free_port, stop, tarq_command, wait_http

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path, subprocess_env):
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(tarq_command("serve", "--port", str(port)), env=subprocess_env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", proc)
            yield f"http://127.0.0.1:{port}", (tmp_path / "data" / "api_key").read_text().strip()
        finally:
            stop(proc)


def remote(env, *args):
    return subprocess.run(tarq_command("remote", *args), env=env, capture_output=True, text=True, timeout=600)


def test_quantize_a_local_folder_on_the_server_and_get_it_back(server, subprocess_env, tiny_whisper_dir, clips,
                                                               clip_transcripts, tmp_path):
    from tarq.artifact import load_artifact
    from tarq.qlinear import QuantLinear

    url, key = server
    calib = tmp_path / "calib"
    calib.mkdir()
    for clip in clips[:3]:
        shutil.copy(clip, calib / clip.name)
    (calib / "transcripts.tsv").write_bytes(clip_transcripts)
    mine = shutil.copytree(tiny_whisper_dir, tmp_path / "my-whisper")  # not under the server's model roots
    env = dict(subprocess_env, TARQ_API_KEY=key)
    done = remote(env, "quantize", mine, "--server", url, "--calib", calib, "--method", "gptq",
                  "--num-samples", "3", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    model_id = done.stdout.strip()
    assert re.fullmatch(r"my-whisper-gptq-w4g128-[0-9a-f]{16}", model_id), model_id  # named after the upload
    assert "uploaded" in done.stderr and "downloaded to" in done.stderr
    model, _ = load_artifact(tmp_path / "out")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) > 0


def test_refusals_are_one_line_with_the_servers_reason(server, subprocess_env, tmp_path):
    url, key = server
    bad_key = remote(dict(subprocess_env, TARQ_API_KEY="wrong"), "quantize", "tiny-whisper", "--server", url,
                     "--method", "rtn")
    assert bad_key.returncode == 1 and "server said 401: invalid API key" in bad_key.stderr
    assert "Traceback" not in bad_key.stderr
    no_audio = remote(dict(subprocess_env, TARQ_API_KEY=key), "quantize", "tiny-whisper", "--server", url)
    assert no_audio.returncode == 1 and "needs calibration audio" in no_audio.stderr
    nobody = remote(dict(subprocess_env, TARQ_API_KEY=key), "quantize", "tiny-whisper", "--server",
                    f"http://127.0.0.1:{free_port()}", "--method", "rtn")
    assert nobody.returncode == 1 and "cannot reach" in nobody.stderr and "Traceback" not in nobody.stderr


def test_a_streamed_refusal_reads_as_one_line(server, tmp_path):
    """Following or downloading what the server does not have: its 404 message, not httpx's ResponseNotRead."""
    import click
    from tqdm import tqdm

    from tarq.cli_remote import Remote

    url, key = server
    api = Remote(url, key)
    with pytest.raises(click.ClickException, match="server said 404: no quantization job with id 'nope'"), tqdm(disable=True) as bar:
        api.follow("nope", bar)
    with pytest.raises(click.ClickException, match="server said 404: no model with id 'nope'"):
        api.download("nope", tmp_path / "out")
