"""WebDataset shards read over HTTP (fsspec): brace patterns, retries with backoff, shards that fail for good."""

import http.server
import threading
from collections import Counter
from pathlib import Path

import pytest

from cnnlab import UserError
from cnnlab.data import DataModule
from cnnlab.sources import shard_list
from conftest import CIFAR10, QUICKSTART, cnnlab, mlflow_client, only_run, write_shard


class Server:
    """A loopback HTTP server of a folder. `plan[path]` lists what the next requests of a path get: `503`, `cut`
    (half the file, then the connection closes), `hang` (no answer until the test ends) or `404`; then the file."""

    def __init__(self, folder: Path):
        self.plan: dict[str, list[str]] = {}
        self.requests: Counter = Counter()
        self.release = threading.Event()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                server.requests[self.path] += 1
                action = server.plan.get(self.path, []).pop(0) if server.plan.get(self.path) else None
                if action == "hang":
                    server.release.wait()
                elif action in ("503", "404"):
                    self.send_error(int(action))
                elif action == "cut":
                    data = (folder / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                else:
                    super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()


@pytest.fixture
def serve():
    servers = []

    def start(folder: Path) -> Server:
        servers.append(Server(folder))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.mark.slow
def test_a_recipe_trains_from_shards_served_over_http_with_a_flaky_shard(serve, workdir):
    server = serve(CIFAR10.parent)
    server.plan["/cifar10/train-00001.tar.gz"] = ["503", "cut"]  # fails twice, then answers
    source = f"{server.url}/cifar10/{{train-{{00000..00001}},test-00000}}.tar.gz"
    fit = cnnlab(  # a process of its own: its loader worker is a fork, which a test process must not make
        *["fit", "--config", QUICKSTART, f"--data.source={source}", "--data.stream=true", "--data.num_workers=1"],
        *["--data.image_size=16", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3"],
        *["--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", "--model.lr_scheduler=null"],
        cwd=workdir,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = only_run(mlflow_client())
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
    # both failures were met (and retried) while the shard was indexed; the fit then read it again
    assert server.plan["/cifar10/train-00001.tar.gz"] == [] and server.requests["/cifar10/train-00001.tar.gz"] >= 4
    # same samples as the local shards: same fingerprint
    local = DataModule(f"{CIFAR10}/{{train-{{00000..00001}},test-00000}}.tar.gz", val_fraction=0.15, num_workers=0)
    assert run.data.tags["cnnlab.data.fingerprint"] == local.describe()["fingerprint"]
    assert local.describe()["sizes"] == {"train": 17_000, "val": 3_000, "test": 10_000}


@pytest.mark.slow
def test_a_shard_that_never_answers_stops_with_its_name_or_is_left_out(serve):
    server = serve(CIFAR10.parent)
    server.plan["/cifar10/test-00000.tar.gz"] = ["hang"] * 4
    source = f"{server.url}/cifar10/{{train-00000,test-00000}}.tar.gz"
    with pytest.raises(UserError, match=r"shard .*/cifar10/test-00000.tar.gz is unreadable after 2 attempts"):
        DataModule(source, retries=1, timeout=0.5, num_workers=0)
    dm = DataModule(source, retries=1, timeout=0.5, num_workers=0, on_bad_image="skip")
    assert dm.left_out == [f"{server.url}/cifar10/test-00000.tar.gz"]
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 8000, "val": 1000, "test": 1000}
    assert dm.describe()["left_out_shards"] == dm.left_out


@pytest.mark.slow
def test_a_shard_gone_while_streaming_stops_the_fit_or_is_skipped_and_counted(serve, tmp_path):
    for k in range(2):
        write_shard(tmp_path / f"train-{k:05d}.tar.gz", 40 * k, 40)
    server = serve(tmp_path)
    source = f"{server.url}/train-{{00000..00001}}.tar.gz"
    for skip in (False, True):
        server.plan.clear()
        dm = DataModule(
            source,
            stream=True,
            batch_size=8,
            num_workers=0,
            test_fraction=0,
            val_fraction=0,
            retries=1,
            on_bad_image="skip" if skip else "error",
        )
        server.plan["/train-00001.tar.gz"] = ["404"] * 6  # indexed, then gone
        if not skip:
            with pytest.raises(UserError, match=r"train-00001.tar.gz is unreadable after 2 attempts \(HTTP 404"):
                list(dm.dataset("train"))
            continue
        samples = list(dm.dataset("train"))
        assert len(samples) == 80 and dm.skipped == 40  # the quota filled again from the shard that answers
        assert {int(image[0, 0, 0]) for image, _ in samples} == set(range(40))


def test_a_local_brace_pattern_names_a_missing_shard():
    with pytest.raises(UserError, match=r"train-00005.tar.gz does not exist \(1 missing\)"):
        DataModule(f"{CIFAR10}/train-{{00004..00005}}.tar.gz", num_workers=0)


def test_a_folder_url_lists_its_shards(serve):
    server = serve(CIFAR10.parent)
    names = ["test-00000", *(f"train-{k:05d}" for k in range(5))]
    assert shard_list(f"{server.url}/cifar10/") == [f"{server.url}/cifar10/{n}.tar.gz" for n in names]
