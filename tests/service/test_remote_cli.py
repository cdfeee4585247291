"""`tarq remote` against a real `tarq serve` (embedded): a local folder is uploaded, quantized with
calibration clips, followed and downloaded; models are evaluated on the same clips; refusals are one line
naming the server's reason."""
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
    import json

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
                  "--num-samples", "3", "--set", "sequential=layer", "--set", "damp=0.02", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    model_id = done.stdout.strip()
    assert re.fullmatch(r"my-whisper-gptq-w4g128-[0-9a-f]{16}", model_id), model_id  # named after the upload
    assert "uploaded" in done.stderr and "downloaded to" in done.stderr
    model, _ = load_artifact(tmp_path / "out")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) > 0
    config = json.loads((tmp_path / "out" / "tarq_report.json").read_text())["config"]
    assert (config["sequential"], config["damp"], config["num_samples"]) == ("layer", 0.02, 3)  # --set reached it


def test_evaluate_a_server_model_and_a_local_folder_on_the_same_clips(server, subprocess_env, tiny_whisper_dir,
                                                                     clips, clip_transcripts, tmp_path):
    """`tarq remote eval` queues one evaluation per model (a local folder is uploaded first), follows them
    and prints `tarq eval`'s table; --json keeps every result with its hypotheses."""
    import json

    url, key = server
    data = tmp_path / "clips"  # tmp_path/data is the server's
    data.mkdir()
    for clip in clips[:2]:
        shutil.copy(clip, data / clip.name)
    names = {c.name for c in clips[:2]}
    (data / "transcripts.tsv").write_text("".join(ln + "\n" for ln in clip_transcripts.decode().splitlines()
                                                  if ln.split("\t", 1)[0] in names))
    mine = shutil.copytree(tiny_whisper_dir, tmp_path / "my-whisper")
    env = dict(subprocess_env, TARQ_API_KEY=key)
    done = remote(env, "eval", "tiny-whisper", mine, "--server", url, "--data", data, "--json", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr
    rows = [ln for ln in done.stdout.splitlines() if ln.startswith("| ") and "WER" not in ln]
    assert len(rows) == 2 and rows[0].split("|")[1].strip().endswith("tiny-whisper"), done.stdout
    assert rows[1].split("|")[1].strip().startswith("my-whisper-"), done.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert [set(r["hypotheses"]) for r in results] == [names, names]
    assert results[0]["words"] == results[1]["words"] and results[0]["wer"] == results[1]["wer"]  # same weights
    (data / "transcripts.tsv").unlink()
    refused = remote(env, "eval", "tiny-whisper", "--server", url, "--data", data)
    assert refused.returncode == 1 and "has no transcripts.tsv" in refused.stderr


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
    key_env = dict(subprocess_env, TARQ_API_KEY=key)
    out_of_range = remote(key_env, "quantize", "tiny-whisper", "--server", url, "--method", "rtn",
                          "--set", "zipf_threshold=9")
    assert out_of_range.returncode == 1 and "zipf_threshold must be in (0, 8]" in out_of_range.stderr
    not_a_field = remote(key_env, "quantize", "tiny-whisper", "--server", url, "--set", "zipf_threshold")
    assert not_a_field.returncode == 2 and "FIELD=VALUE" in not_a_field.stderr


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


class DropFirstAnswer:
    """A TCP proxy to `target` that relays everything, except that on its first connection it hangs up as
    soon as the server starts to answer: the server did the work, the client never hears of it."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self.target_port, self.connections = target_port, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            drop = self.connections == 1
            threading.Thread(target=self.pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self.pump, args=(upstream, client, drop), daemon=True).start()

    @staticmethod
    def pump(src, dst, drop: bool):
        import socket

        try:
            while chunk := src.recv(65536):
                if drop:
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        for sock in (src, dst):  # shutdown, not only close: the other direction's thread still holds them
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass


def test_a_submission_whose_answer_is_lost_is_sent_again_and_runs_once(server, subprocess_env, tmp_path):
    """The first POST reaches the server, which queues the job, but its answer never comes back: the
    client sends it again under the same Idempotency-Key and gets the same job, not a second one."""
    import httpx

    url, key = server
    proxy = DropFirstAnswer(int(url.rsplit(":", 1)[1]))
    done = remote(dict(subprocess_env, TARQ_API_KEY=key), "quantize", "tiny-whisper", "--server", proxy.url,
                  "--method", "rtn")
    assert done.returncode == 0, done.stderr
    assert "/quantizations: RemoteProtocolError; sending it again" in done.stderr
    listed = httpx.get(f"{url}/v1/quantizations", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert len(listed) == 1 and listed[0]["status"] == "succeeded" and listed[0]["idempotency_key"]
    assert done.stdout.strip() == listed[0]["model"]
    proxy.listener.close()
