"""A locked tracking server: the README's multi-machine recipe with MLflow's own authentication.

`mlflow server --app-name basic-auth` (the mlflow[auth] extra) with its users in PostgreSQL and
default permission READ; the admin creates a user for the sweep, whose workers get the
credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD next to SWEEP_STORAGE_URL
and MLFLOW_TRACKING_URI. The sweep runs end to end through the server; then a client without
credentials (401) and a user with only the default READ permission (403) can neither log to the
experiment nor move the alias, which still points where the sweep put it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import check_invariant, ok, toy_app
from mlflow.tracking import MlflowClient
from servers import create_database, free_port, wait_for_http

pytestmark = pytest.mark.slow

N_TRIALS = 3
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
README = Path(__file__).resolve().parent.parent / "README.md"
README_USERS_DB = "postgresql://postgres@DBHOST/mlflow_users"


def readme_auth_config() -> str:
    """The auth config file of the README's "Many workers, one study", as printed."""
    section = README.read_text().split("## Many workers, one study", 1)[1].split("\n## ", 1)[0]
    config = re.search(r"cat > basic_auth.ini <<'EOF'\n(.*?\n)EOF\n", section, re.S).group(1)
    assert "default_permission = READ" in config and README_USERS_DB in config
    return config


@dataclass
class User:
    name: str
    password: str  # the server wants at least 12 characters


@dataclass
class AuthServer:
    url: str
    admin: User


@pytest.fixture
def auth_server(postgres, tmp_path):
    """The tracking host: runs and users in PostgreSQL, artifacts served from a folder."""
    suffix = uuid.uuid4().hex[:8]
    backend = create_database(postgres, f"mlflow_{suffix}")
    users = create_database(postgres, f"mlflow_users_{suffix}")
    host = tmp_path / "tracking-host"
    host.mkdir()
    config = host / "basic_auth.ini"
    config.write_text(readme_auth_config().replace(README_USERS_DB, users))
    admin = User("admin", f"admin-{uuid.uuid4().hex}")
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        MLFLOW_AUTH_CONFIG_PATH=str(config),
        MLFLOW_AUTH_ADMIN_PASSWORD=admin.password,  # creates the admin on the first start
        MLFLOW_FLASK_SERVER_SECRET_KEY=uuid.uuid4().hex,
        # no background job runner (7 more processes, for GenAI jobs the sweep never starts)
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = host / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
             "--backend-store-uri", backend, "--artifacts-destination", str(host / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )  # fmt: skip
        try:
            wait_for_http(f"{url}/health", server, lambda: log_path.read_text())
            yield AuthServer(url, admin)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def login(monkeypatch, user: User | None) -> None:
    """This process's MLflow client speaks as `user` (or without credentials)."""
    for variable in CREDENTIALS:
        monkeypatch.delenv(variable, raising=False)
    if user is not None:
        monkeypatch.setenv(CREDENTIALS[0], user.name)
        monkeypatch.setenv(CREDENTIALS[1], user.password)


def call(url: str, method: str, endpoint: str, body: dict, user: User | None) -> int:
    """One REST call as `user` (None: no credentials); its HTTP status."""
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    if user is not None:
        token = base64.b64encode(f"{user.name}:{user.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as err:
        err.close()
        return err.code


def test_a_sweep_runs_through_a_locked_tracking_server_that_refuses_anyone_else(
    tmp_path, postgres, auth_server, monkeypatch
):
    url = auth_server.url
    sweeper = User("sweeper", f"sweeper-{uuid.uuid4().hex}")
    reader = User("reader", f"reader-{uuid.uuid4().hex}")  # the default permission: READ
    for user in (sweeper, reader):  # the admin creates them, as the README's curl line does
        new = {"username": user.name, "password": user.password}
        assert call(url, "POST", "users/create", new, auth_server.admin) == 200

    # a worker machine: both URLs and the credentials in the environment, two workers here
    folder = tmp_path / "worker"
    storage_url = create_database(postgres, f"optuna_auth_{uuid.uuid4().hex[:8]}")
    toy = toy_app(folder)
    command = [
        a
        for a in toy.command("hydra.sweeper.n_jobs=2", f"hydra.sweeper.n_trials={N_TRIALS}")
        if not a.startswith(("hydra.sweeper.storage=", "hydra.sweeper.tracking_uri="))
    ]
    # the toy app's config names a sqlite storage; an app on the sweeper's default reads
    # SWEEP_STORAGE_URL without this argument
    command.append("hydra.sweeper.storage=${oc.env:SWEEP_STORAGE_URL}")
    env = toy.env(
        SWEEP_STORAGE_URL=storage_url,
        MLFLOW_TRACKING_URI=url,
        MLFLOW_TRACKING_USERNAME=sweeper.name,
        MLFLOW_TRACKING_PASSWORD=sweeper.password,
    )
    proc = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=500)
    ok(proc)
    assert proc.stdout.count("Study 'toy' (postgresql://") == 2  # the main process and a worker

    # end to end, read back by the reader: runs, the best tag, a registered version, the alias
    login(monkeypatch, reader)
    toy.storage, toy.tracking_uri = storage_url, url
    try:
        check_invariant(toy, n_trials=N_TRIALS)
    finally:
        toy.close()
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("toy").experiment_id
    (best,) = [r for r in toy.all_runs() if r.data.tags.get("best_run") == "true"]
    champion = client.get_model_version_by_alias("toy-model", "champion")
    assert str(champion.version) == "1"

    # a second version for an intruder to point the alias at (the sweep's user may)
    login(monkeypatch, sweeper)
    model_id = champion.source.removeprefix("models:/")  # the logged model the sweep registered
    second = client.create_model_version(
        "toy-model", champion.source, run_id=champion.run_id, model_id=model_id
    )
    assert str(second.version) == "2"

    attempts = [
        ("POST", "runs/log-metric",
         {"run_id": best.info.run_id, "key": "intruder", "value": 1.0, "timestamp": 0}),
        ("POST", "runs/create", {"experiment_id": experiment, "run_name": "intruder"}),
        ("POST", "registered-models/alias",
         {"name": "toy-model", "alias": "champion", "version": "2"}),
        ("DELETE", "registered-models/alias", {"name": "toy-model", "alias": "champion"}),
    ]  # fmt: skip
    for method, endpoint, body in attempts:
        assert call(url, method, endpoint, body, None) == 401, endpoint  # no credentials
        assert call(url, method, endpoint, body, User("sweeper", "wrong-password")) == 401
        assert call(url, method, endpoint, body, reader) == 403, endpoint  # READ only

    login(monkeypatch, reader)
    assert str(client.get_model_version_by_alias("toy-model", "champion").version) == "1"
    assert "intruder" not in client.get_run(best.info.run_id).data.metrics
    assert [r.info.run_name for r in toy.all_runs() if r.info.run_name == "intruder"] == []

    # the same call with the sweep's credentials does move it: the refusals were about who asked
    alias = attempts[2]
    assert call(url, *alias, sweeper) == 200
    assert str(client.get_model_version_by_alias("toy-model", "champion").version) == "2"
