"""A Hugging Face Hub on this machine, for the download tests: the four calls huggingface_hub makes to fetch a
snapshot (the revision's commit, the file tree, each file's metadata and its bytes) answered from local folders,
and every request recorded. Point a process at it with ``HF_ENDPOINT``."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    """Serves ``repos`` (repository id -> folder) at revision ``main`` (or the commit it names) until ``close()``;
    ``branches`` (repository id -> {branch name -> folder}) adds other revisions, each with its own commit."""

    def __init__(self, repos: dict[str, Path], branches: dict[str, dict[str, Path]] | None = None) -> None:
        self.repos = {repo: Path(folder) for repo, folder in repos.items()}
        self.commits = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}
        # (repository, revision: a branch name or a commit) -> (folder, commit)
        self.revisions: dict[tuple[str, str], tuple[Path, str]] = {}
        for repo, folder in self.repos.items():
            self.revisions[repo, "main"] = self.revisions[repo, self.commits[repo]] = (folder, self.commits[repo])
        for repo, named in (branches or {}).items():
            for branch, folder in named.items():
                commit = hashlib.sha1(f"{repo}@{branch}".encode()).hexdigest()
                self.revisions[repo, branch] = self.revisions[repo, commit] = (Path(folder), commit)
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo: str, revision: str = "main") -> list[str]:
        root = self.revisions[repo, revision][0]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def _answer(self, method: str, path: str) -> tuple[int, bytes, dict[str, str]]:
        self.requests.append((method, path))
        parts = path.strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo = "/".join(parts[2:4] if api else parts[:2])
        if repo not in self.repos:
            return 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}
        rest = parts[4:] if api else parts[2:]
        if len(rest) < 2 or (repo, rest[1]) not in self.revisions:
            return 404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}
        root, commit = self.revisions[repo, rest[1]]
        if api and rest[0] == "revision":
            body = {"id": repo, "sha": commit, "private": False,
                    "siblings": [{"rfilename": name} for name in self.files(repo, rest[1])]}
            return 200, json.dumps(body).encode(), {"Content-Type": "application/json"}
        if api and rest[0] == "tree":
            body = [{"type": "file", "path": name, "size": (root / name).stat().st_size,
                     "oid": hashlib.sha1((root / name).read_bytes()).hexdigest()} for name in self.files(repo, rest[1])]
            return 200, json.dumps(body).encode(), {"Content-Type": "application/json"}
        if not api and rest[0] == "resolve":
            file = root / "/".join(rest[2:])
            if not file.is_file():
                return 404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"}
            data = file.read_bytes()
            return 200, data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        return 404, b"{}", {}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, head: bool) -> None:
                status, body, headers = hub._answer(self.command, unquote(urlparse(self.path).path))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self._reply(head=False)

            def do_HEAD(self) -> None:
                self._reply(head=True)

        return Handler
