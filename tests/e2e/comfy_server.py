"""Run a real ComfyUI host (``.host/ComfyUI``, see ``scripts/setup.sh``, or the one named by
``AKL_HOST_DIR``, e.g. ``.host/ComfyUI-0.8.0`` from ``scripts/setup_host2.sh``) as a
subprocess and talk to it over HTTP / WebSocket.

Deliberately free of pytest so that scripts (demo, benchmarks) can reuse it::

    from tests.e2e.comfy_server import ComfyServer
    with ComfyServer() as srv:
        with srv.collect_ws_events() as ws:
            pid = srv.post_prompt(graph)["prompt_id"]
            entry = srv.wait_for(pid, timeout=300)
        print(ws.events_for(pid))

Every server gets its own temporary directory holding ``output/``,
``input/``, ``user/``, ``temp/`` and (unless ``models_dir`` is given)
``models/`` with a ``vae/`` subfolder, registered through a generated
``--extra-model-paths-config`` YAML with ``is_default: true`` so that those
folders are searched first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_COMFY_DIR = REPO_ROOT / ".host" / "ComfyUI"


def selected_host_dir() -> Path:
    """The host the tests run against: ``AKL_HOST_DIR`` (absolute, or relative to the repository
    root) when set, else ``.host/ComfyUI`` (0.3.75)."""
    named = os.environ.get("AKL_HOST_DIR")
    if not named:
        return DEFAULT_COMFY_DIR
    path = Path(named)
    return path if path.is_absolute() else REPO_ROOT / path


def host_site_dir(comfy_dir: Path) -> Optional[Path]:
    """The packages a host needs beyond the shared venv, kept out of it: ``.host/py-<version>``
    beside ``.host/ComfyUI-<version>`` (see scripts/setup_host2.sh), None when there is none."""
    name = Path(comfy_dir).name
    if "-" not in name:
        return None
    site = Path(comfy_dir).parent / ("py-" + name.split("-", 1)[1])
    return site if site.is_dir() else None


def missing_host_reason(comfy_dir: Path) -> str:
    """Why the tests cannot use the selected host: the line a skip prints."""
    if Path(comfy_dir) == DEFAULT_COMFY_DIR:
        return f"ComfyUI host not installed at {comfy_dir} (run scripts/setup.sh)"
    return (f"ComfyUI host {comfy_dir} (AKL_HOST_DIR) not installed: scripts/setup_host2.sh found neither "
            "shared/hosts/ComfyUI-0.8.0.tar.gz nor a network for git, so the second-host tests are skipped")


COMFY_DIR = selected_host_dir()
ARTIFACTS_DIR = REPO_ROOT / "tests" / "artifacts"

# Model folder kinds created under the temp models dir and registered with
# the host through the extra-model-paths YAML.
MODEL_KINDS = ("vae", "checkpoints", "vae_approx")

DEFAULT_ARGS = (
    "--disable-api-nodes",
    "--database-url",
    "sqlite:///:memory:",
)


class ComfyServerError(RuntimeError):
    """The host process failed to start, died, or timed out."""


class PromptRejected(RuntimeError):
    """POST /prompt answered HTTP 400 (validation failed).

    ``body`` is the decoded JSON (``{"error": {...}, "node_errors": {...}}``)
    or the raw text when it was not JSON.
    """

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        super().__init__(
            f"POST /prompt rejected with HTTP {status}: "
            f"{json.dumps(body, indent=2) if not isinstance(body, str) else body}"
        )


def find_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_python() -> str:
    venv_py = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv_py) if venv_py.exists() else sys.executable


def has_frontend(python: str, env: Optional[dict] = None) -> bool:
    """Whether `python` imports the host's editor (comfyui-frontend-package), without which the
    host exits at start-up unless --front-end-root names a folder to serve instead."""
    probe = subprocess.run([python, "-c", "import comfyui_frontend_package"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return probe.returncode == 0


class WsCollector:
    """Gathers every message from ``ws://host/ws?clientId=...`` in a thread.

    JSON text frames are stored as dicts in ``events``; binary frames
    (latent previews) are stored as ``{"type": "binary", "data": bytes}``.
    """

    def __init__(self, url: str, timeout: float = 10.0):
        import websocket  # websocket-client

        self.url = url
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._ws = websocket.WebSocket()
        self._ws.connect(url, timeout=timeout)
        self._ws.settimeout(0.5)
        self._thread = threading.Thread(target=self._run, name="comfy-ws", daemon=True)
        self._thread.start()
        # The server always greets a new socket with a "status" message;
        # waiting for it guarantees registration before any prompt is posted.
        self.wait_for_event(lambda e: e.get("type") == "status", timeout=timeout)

    def _run(self) -> None:
        import websocket

        while not self._closed.is_set():
            try:
                opcode, data = self._ws.recv_data()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:  # connection closed / server gone
                break
            if opcode == websocket.ABNF.OPCODE_TEXT:
                try:
                    event = json.loads(data.decode("utf-8"))
                except ValueError:
                    event = {"type": "invalid_json", "data": data}
            elif opcode == websocket.ABNF.OPCODE_BINARY:
                event = {"type": "binary", "data": bytes(data)}
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            else:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        self._closed.set()
        with self._cond:
            self._cond.notify_all()

    def wait_for_event(self, predicate: Callable[[dict], bool], timeout: float = 60.0) -> dict:
        """Block until an event matching ``predicate`` has arrived; return it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for ev in self.events[seen:]:
                    if predicate(ev):
                        return ev
                seen = len(self.events)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no matching websocket event within {timeout}s; "
                        f"got types {[e.get('type') for e in self.events]}"
                    )
                if self._closed.is_set():
                    raise ComfyServerError("websocket closed before a matching event arrived")
                self._cond.wait(min(remaining, 0.5))

    def events_for(self, prompt_id: str, types: Optional[Iterable[str]] = None) -> list[dict]:
        """JSON events whose ``data.prompt_id`` is ``prompt_id`` (optionally filtered by type)."""
        wanted = set(types) if types is not None else None
        with self._cond:
            evs = list(self.events)
        out = []
        for ev in evs:
            data = ev.get("data")
            if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
                continue
            if wanted is not None and ev.get("type") not in wanted:
                continue
            out.append(ev)
        return out

    def close(self) -> None:
        self._closed.set()
        try:
            self._ws.close()
        except Exception:
            pass
        self._thread.join(timeout=5)

    def __enter__(self) -> "WsCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ComfyServer:
    def __init__(
        self,
        port: Optional[int] = None,
        extra_args: Iterable[str] = (),
        models_dir: Optional[os.PathLike | str] = None,
        *,
        python: Optional[str] = None,
        comfy_dir: os.PathLike | str = COMFY_DIR,
        log_dir: os.PathLike | str = ARTIFACTS_DIR,
        startup_timeout: float = 120.0,
        env: Optional[dict] = None,
        cpu: Optional[bool] = None,
    ):
        self.host = "127.0.0.1"
        self._requested_port = port
        self.port: Optional[int] = None
        self.extra_args = tuple(extra_args)
        self.python = python or default_python()
        self.comfy_dir = Path(comfy_dir)
        self.log_dir = Path(log_dir)
        self.startup_timeout = startup_timeout
        self.env = env
        # --cpu unless told otherwise (COMFY_E2E_CPU=0 runs on the accelerator).
        self.cpu = cpu if cpu is not None else os.environ.get("COMFY_E2E_CPU", "1") != "0"
        self.client_id = uuid.uuid4().hex
        self.startup_seconds: Optional[float] = None

        self.tmp_dir: Optional[Path] = None
        self._own_models_dir = models_dir is None
        self.models_dir: Optional[Path] = Path(models_dir) if models_dir is not None else None
        self.log_path: Optional[Path] = None
        self._proc: Optional[subprocess.Popen] = None
        self._log_file = None

    # ------------------------------------------------------------------ paths
    @property
    def url(self) -> str:
        if self.port is None:
            raise ComfyServerError("server not started")
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def vae_dir(self) -> Path:
        assert self.models_dir is not None
        return self.models_dir / "vae"

    @property
    def output_dir(self) -> Path:
        assert self.tmp_dir is not None
        return self.tmp_dir / "output"

    @property
    def input_dir(self) -> Path:
        assert self.tmp_dir is not None
        return self.tmp_dir / "input"

    @property
    def user_dir(self) -> Path:
        assert self.tmp_dir is not None
        return self.tmp_dir / "user"

    # -------------------------------------------------------------- lifecycle
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "ComfyServer":
        if self.is_running():
            return self
        main_py = self.comfy_dir / "main.py"
        if not main_py.is_file():
            raise ComfyServerError(f"{main_py} missing: {missing_host_reason(self.comfy_dir)}")

        self.port = self._requested_port or find_free_port(self.host)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix="comfy-e2e-"))
        for sub in ("output", "input", "user", "temp"):
            (self.tmp_dir / sub).mkdir()
        if self.models_dir is None:
            self.models_dir = self.tmp_dir / "models"
        for kind in MODEL_KINDS:
            (self.models_dir / kind).mkdir(parents=True, exist_ok=True)

        extra_yaml = self.tmp_dir / "extra_model_paths.yaml"
        lines = ["e2e:", f"    base_path: {json.dumps(str(self.models_dir))}", "    is_default: true"]
        lines += [f"    {kind}: {kind}/" for kind in MODEL_KINDS]
        extra_yaml.write_text("\n".join(lines) + "\n", encoding="utf-8")

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"comfy-server-{self.port}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        self._log_file = open(self.log_path, "wb")

        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        site = host_site_dir(self.comfy_dir)
        if site is not None:  # this host's own packages, ahead of the shared venv's
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
        frontend = ()
        if "--front-end-root" not in self.extra_args and not has_frontend(self.python, env):
            # an API-only host (a bare accelerator machine, see scripts/device_kit.sh): serve a stub
            # page instead of the editor, so that the host starts; the HTTP API is unchanged
            root = self.tmp_dir / "frontend"
            root.mkdir()
            (root / "index.html").write_text("<!doctype html><title>ComfyUI (API only)</title>\n", encoding="utf-8")
            frontend = ("--front-end-root", str(root))

        cmd = [
            self.python,
            str(main_py),
            "--listen", self.host,
            "--port", str(self.port),
            *(("--cpu",) if self.cpu else ()),
            *DEFAULT_ARGS,
            "--output-directory", str(self.output_dir),
            "--input-directory", str(self.input_dir),
            "--user-directory", str(self.user_dir),
            "--temp-directory", str(self.tmp_dir / "temp"),
            "--extra-model-paths-config", str(extra_yaml),
            *frontend,
            *self.extra_args,
        ]
        self._log_file.write(("$ " + " ".join(cmd) + "\n").encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            cmd,
            cwd=str(self.comfy_dir),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

        t0 = time.monotonic()
        deadline = t0 + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._cleanup()
                raise ComfyServerError(
                    f"ComfyUI exited with code {rc} during startup; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                self._request("GET", "/object_info", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ComfyServerError(
                    f"ComfyUI did not answer /object_info within {self.startup_timeout}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.25)
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, kill_after: float = 15.0) -> Optional[int]:
        """SIGTERM the server, SIGKILL after ``kill_after`` seconds. Returns the exit code."""
        rc = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=kill_after)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=10)
            rc = self._proc.returncode
        self._cleanup()
        return rc

    def _cleanup(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.tmp_dir is not None and self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir = None
        if self._own_models_dir:
            self.models_dir = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30.0):
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", errors="replace")

    def get_json(self, path: str, timeout: float = 30.0):
        return self._request("GET", path, timeout=timeout)

    def object_info(self, node_class: Optional[str] = None) -> dict:
        if node_class is None:
            return self._request("GET", "/object_info", timeout=60)
        return self._request("GET", "/object_info/" + urllib.parse.quote(node_class))

    def post_prompt(self, prompt: dict, client_id: Optional[str] = None, **extra) -> dict:
        """Queue an API-format graph. Returns ``{"prompt_id", "number", "node_errors"}``.

        Raises :class:`PromptRejected` (with the decoded body) on HTTP 400.
        """
        payload = {"prompt": prompt, "client_id": client_id or self.client_id, **extra}
        try:
            return self._request("POST", "/prompt", payload)
        except urllib.error.HTTPError as e:
            raw = e.read().decode("utf-8", errors="replace")
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw
            if e.code == 400:
                raise PromptRejected(e.code, body) from None
            raise ComfyServerError(f"POST /prompt failed with HTTP {e.code}: {raw}") from None

    def history(self, prompt_id: str) -> dict:
        return self._request("GET", "/history/" + urllib.parse.quote(prompt_id))

    def wait_for(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> dict:
        """Poll /history/{id} until the prompt finished (success or error); return its entry.

        The entry has ``status`` (``status_str`` is ``"success"`` or
        ``"error"``, ``messages`` holds ``execution_error`` details),
        ``outputs`` (node id -> ui dict) and ``prompt``.
        """
        deadline = time.monotonic() + timeout
        while True:
            hist = self.history(prompt_id)
            if isinstance(hist, dict) and prompt_id in hist:
                return hist[prompt_id]
            if not self.is_running():
                raise ComfyServerError(
                    f"ComfyUI died while waiting for {prompt_id}; log tail:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s")
            time.sleep(poll)

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def queue(self) -> dict:
        return self._request("GET", "/queue")

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self._request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})

    def collect_ws_events(self, client_id: Optional[str] = None) -> WsCollector:
        """Open ``/ws?clientId=...`` (default: this server's ``client_id``, the one
        :meth:`post_prompt` uses) and collect messages in a background thread.
        Connect *before* posting the prompt; close it (or use ``with``) after."""
        cid = client_id or self.client_id
        return WsCollector(f"{self.ws_url}?clientId={urllib.parse.quote(cid)}")
