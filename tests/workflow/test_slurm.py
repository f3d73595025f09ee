"""Run workflows through a real one-node SLURM cluster and compare them with local runs.

The module fixture starts the cluster with the project's own script (``.ci/slurm/start.sh``:
munged, slurmctld and slurmd on this machine, state in a temporary folder; under a second) and
stops exactly the daemons it started (``.ci/slurm/stop.sh``, by their pid files). Each test runs a
workflow twice, in temporary folders: through ``--executor slurm`` with ``workflow/profiles/slurm``,
and locally with ``--cores 2``; it checks that the jobs went through SLURM and that both runs give
the same results.

Needs root and the Slurm packages (``.ci/slurm/install.sh``); skipped otherwise, unless
``CAPSMED_REQUIRE_SLURM=1`` (CI), which turns the skip into a failure. One cluster per machine:
a lock file makes a second pytest process (an xdist worker) wait until the first one's cluster
has stopped; ``--dist loadgroup`` keeps all these tests on one worker. Environment knobs:
``CAPSMED_SLURM_TEST_TIMEOUT`` (seconds per snakemake run, default 900),
``CAPSMED_KEEP_SLURM_STATE=1`` (keep the cluster's state folder in /tmp).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.require import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
SLURM_SCRIPTS = REPO / ".ci" / "slurm"
PROFILE = REPO / "workflow" / "profiles" / "slurm"
TOY_SNAKEFILE = Path(__file__).resolve().parent / "data" / "toy" / "Snakefile"
SNAKEFILE = REPO / "Snakefile"
TINY_CONFIG = REPO / "tests" / "workflow" / "tiny_config.yaml"

RUN_TIMEOUT = int(os.environ.get("CAPSMED_SLURM_TEST_TIMEOUT", "900"))
SCRIPT_TIMEOUT = 180
#: The machine-wide lock held while a test cluster runs (they would share /run/slurm/conf).
LOCK_FILE = Path(tempfile.gettempdir()) / "capsmed-slurm-test.lock"
#: Seconds before the plugin's first status check (its default, 40, is for real clusters).
INIT_DELAY = 2
#: Absolute tolerance for numbers that must agree between the SLURM and the local run.
TOLERANCE = 1e-6
#: Keys whose values describe one run (time, memory, file hashes), not its results.
UNCOMPARED_KEYS = frozenset({
    "slurm_job_ids", "seconds", "train_seconds", "inference_seconds_per_case",
    "peak_memory_mb", "cost", "versions", "created", "timestamp", "host", "checkpoint_sha256",
})
#: Folders whose file names depend on absolute paths (MONAI PersistentDataset caches).
UNCOMPARED_DIRS = frozenset({"cache"})

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]


@dataclass(frozen=True)
class SlurmCluster:
    """A running test cluster.

    Attributes:
        state_dir: The folder with slurm.conf, logs and pid files.
        env: Environment for clients of this cluster (SLURM_CONF set; no inherited SLURM_*
            variables, site profile or capsmed SLURM settings).
    """

    state_dir: Path
    env: dict[str, str]

    def query(self, *args: str) -> str:
        """Run a Slurm client command (``squeue``, ``scontrol``, ...) and return its stdout."""
        result = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60,
                                check=False)
        assert result.returncode == 0, f"{' '.join(args)} failed: {result.stderr}"
        return result.stdout


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _client_env(slurm_conf: Path | None = None) -> dict[str, str]:
    """This process's environment without SLURM/site settings that would change the runs."""
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SQUEUE_", "SALLOC_", "CAPSMED_SLURM_"))
        and key not in {"SNAKEMAKE_PROFILE", "SNAKEMAKE_SLURM_PARTITIONS"}
    }
    if slurm_conf is not None:
        env["SLURM_CONF"] = str(slurm_conf)
    return env


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def _machine_lock(timeout: float) -> Iterator[None]:
    """Hold LOCK_FILE exclusively; wait up to ``timeout`` seconds for another holder."""
    with LOCK_FILE.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another SLURM test cluster held {LOCK_FILE} for {timeout:.0f}s")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Module scope: the cluster starts in under a second, and the lock is given back as soon as this
# module's tests are done (an xdist worker may have other modules' tests after them).
@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Start a one-node SLURM cluster for this module; stop exactly its daemons afterwards."""
    if os.geteuid() != 0:
        skip_or_fail("SLURM", "the SLURM test cluster needs root (slurmd and slurmctld run as root)")
    sbin_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    if not all(shutil.which(daemon, path=sbin_path) for daemon in ("slurmctld", "slurmd")):
        skip_or_fail("SLURM", "Slurm is not installed (slurmctld/slurmd missing); run "
                              ".ci/slurm/install.sh")
    if Path("/etc/slurm/slurm.conf").exists():
        skip_or_fail("SLURM", "/etc/slurm/slurm.conf exists: this machine has its own Slurm, "
                              "whose configuration the srun inside snakemake's jobs would read")

    with _machine_lock(timeout=2 * RUN_TIMEOUT):
        state_dir = Path(tempfile.mkdtemp(prefix="capsmed-slurm-"))
        ctld_port, slurmd_port = _free_ports(2)
        env = _client_env() | {"CAPSMED_SLURM_CTLD_PORT": str(ctld_port),
                               "CAPSMED_SLURMD_PORT": str(slurmd_port)}
        try:
            start = subprocess.run([str(SLURM_SCRIPTS / "start.sh"), str(state_dir)], env=env,
                                   capture_output=True, text=True, timeout=SCRIPT_TIMEOUT,
                                   check=False)
        except subprocess.TimeoutExpired as exc:
            _stop(state_dir)
            pytest.fail(f"start.sh took over {SCRIPT_TIMEOUT}s: {exc.stderr}")
        if start.returncode != 0:
            _stop(state_dir)
            pytest.fail(f"start.sh failed (exit {start.returncode}):\n{start.stderr}")
        assert start.stdout.strip().splitlines()[-1] == str(state_dir), start.stdout
        pids = {path.stem: int(path.read_text()) for path in (state_dir / "pids").glob("*.pid")}
        assert {"slurmctld", "slurmd"} <= pids.keys(), pids

        cluster = SlurmCluster(state_dir, _client_env(state_dir / "slurm.conf"))
        try:
            yield cluster
        finally:
            stop = _stop(state_dir)
            keep = tmp_path_factory.mktemp("slurm-cluster-logs")
            shutil.copytree(state_dir / "log", keep / "log", dirs_exist_ok=True)
            left = {name: pid for name, pid in pids.items() if _pid_alive(pid)}
            keep_state = os.environ.get("CAPSMED_KEEP_SLURM_STATE") == "1"
            if stop.returncode == 0 and not left and not keep_state:
                shutil.rmtree(state_dir, ignore_errors=True)
            assert stop.returncode == 0, f"stop.sh failed:\n{stop.stderr}"
            assert not left, f"daemons still running after stop.sh: {left}"


def _stop(state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SLURM_SCRIPTS / "stop.sh"), str(state_dir)], capture_output=True,
                          text=True, timeout=SCRIPT_TIMEOUT, check=False)


def _cancel_all_jobs(cluster: SlurmCluster) -> None:
    """Cancel every job of the test cluster (after a run was killed)."""
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster.env, capture_output=True,
                          text=True, timeout=60, check=False).stdout.split()
    if jobs:
        subprocess.run(["scancel", *jobs], env=cluster.env, timeout=60, check=False)


def _run_snakemake(args: list[str], *, workdir: Path, env: dict[str, str], log_name: str,
                   cluster: SlurmCluster | None = None) -> str:
    """Run snakemake in its own process group with a hard timeout; return its output.

    On timeout the whole process group gets SIGTERM, then SIGKILL (the SLURM plugin can hang in
    its status loop and ignore SIGTERM), and the cluster's jobs are cancelled.
    """
    log_path = workdir.parent / f"{log_name}.log"
    command = [sys.executable, "-m", "snakemake", "--directory", str(workdir), *args]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            process.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            if cluster is not None:
                _cancel_all_jobs(cluster)
            pytest.fail(f"snakemake ({log_name}) ran over {RUN_TIMEOUT}s and was killed; "
                        f"end of its output:\n{_tail(log_path)}")
    output = log_path.read_text()
    assert process.returncode == 0, (
        f"snakemake ({log_name}) failed with exit {process.returncode}; command:\n"
        f"{' '.join(command)}\nend of its output ({log_path}):\n{_tail(log_path)}")
    return output


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _run(name: str, snakefile: Path, extra_args: list[str], tmp_path: Path,
         cluster: SlurmCluster) -> tuple[Path, str]:
    """Run the workflow in ``tmp_path/name``: through SLURM (``name == "slurm"``) or locally.

    Returns:
        The results folder and snakemake's output.
    """
    workdir = tmp_path / name
    workdir.mkdir()
    args = ["--snakefile", str(snakefile), *extra_args,
            "--config", f"results={workdir / 'results'}"]
    if name == "slurm":
        args += ["--profile", str(PROFILE),
                 "--slurm-init-seconds-before-status-checks", str(INIT_DELAY)]
        env = cluster.env
    else:
        args += ["--cores", "2"]
        env = _client_env()
    output = _run_snakemake(args, workdir=workdir, env=env, log_name=f"snakemake-{name}",
                            cluster=cluster if name == "slurm" else None)
    return workdir / "results", output


def _check_jobs_went_through_slurm(cluster: SlurmCluster, slurm_output: str) -> set[str]:
    """Check that each non-local job of the run was a completed SLURM job; return their ids.

    Call it right after the run: squeue lists finished jobs for MinJobAge (start.sh: 1 hour).
    A job that failed once and was retried fails the check on purpose.
    """
    run_id = re.search(r"^SLURM run ID: (\S+)$", slurm_output, re.MULTILINE)
    assert run_id, "the snakemake output names no SLURM run ID: did it use the slurm executor?"
    run_id = run_id.group(1)
    submitted = dict(re.findall(r"^Job (\d+) has been submitted with SLURM jobid (\d+)",
                                slurm_output, re.MULTILINE))
    slurm_ids = set(submitted.values())
    # "checkpoint split:" is a job too (the split is a checkpoint for per-case evaluation)
    cluster_rules = set(re.findall(r"^(?:rule|checkpoint) (\w+):", slurm_output, re.MULTILINE))
    n_jobs = len(re.findall(r"^(?:rule|checkpoint) (\w+):", slurm_output, re.MULTILINE))
    assert slurm_ids, "no job was submitted to SLURM"
    assert len(slurm_ids) == n_jobs, f"{n_jobs} rule jobs ran but {len(slurm_ids)} went to SLURM"

    rows = [line.split("|") for line in cluster.query(
        "squeue", "--states=all", "--noheader", "--name", run_id, "--format=%i|%T|%k").splitlines()]
    states = {job_id: state for job_id, state, _ in rows}
    assert set(states) == slurm_ids, (states, slurm_ids)
    assert set(states.values()) == {"COMPLETED"}, states
    comments = {comment for _, _, comment in rows}
    for rule in cluster_rules:
        assert any(c == f"rule_{rule}" or c.startswith(f"rule_{rule}_wildcards_")
                   for c in comments), f"no SLURM job for rule {rule}: {comments}"

    # slurmctld's own records: the submission RPC and the job completion log.
    ctld_log = (cluster.state_dir / "log" / "slurmctld.log").read_text()
    jobcomp = (cluster.state_dir / "log" / "jobcomp.log").read_text()
    for job_id in slurm_ids:
        assert f"_slurm_rpc_submit_batch_job: JobId={job_id} " in ctld_log, job_id
        assert re.search(rf"^JobId={job_id} .*Name={re.escape(run_id)} JobState=COMPLETED ",
                         jobcomp, re.MULTILINE), f"job {job_id} missing from {jobcomp}"
    return slurm_ids


def _check_same_jobs(slurm_output: str, local_output: str) -> None:
    """Every rule that ran locally went to SLURM, except the SLURM run's local rules (``all``)."""
    # Locally, snakemake prints every job as "localrule NAME:".
    local_rules = set(re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):", local_output,
                                 re.MULTILINE))
    cluster_rules = set(re.findall(r"^(?:rule|checkpoint) (\w+):", slurm_output, re.MULTILINE))
    kept_local = set(re.findall(r"^local(?:rule|checkpoint) (\w+):", slurm_output, re.MULTILINE))
    assert local_rules == cluster_rules | kept_local, (local_rules, cluster_rules, kept_local)


def _compare(a: object, b: object, where: str, problems: list[str]) -> None:
    """Collect the differences between two JSON values (numbers within TOLERANCE)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key in UNCOMPARED_KEYS:
                continue
            if key not in a or key not in b:
                problems.append(f"{where}/{key}: only in the {'local' if key in b else 'SLURM'} run")
            else:
                _compare(a[key], b[key], f"{where}/{key}", problems)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            problems.append(f"{where}: {len(a)} items (SLURM) vs {len(b)} (local)")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _compare(x, y, f"{where}[{i}]", problems)
    elif (isinstance(a, int | float) and isinstance(b, int | float)
          and not isinstance(a, bool) and not isinstance(b, bool)):
        same_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        if not same_nan and not math.isclose(a, b, rel_tol=0.0, abs_tol=TOLERANCE):
            problems.append(f"{where}: {a!r} (SLURM) vs {b!r} (local)")
    elif a != b:
        problems.append(f"{where}: {a!r} (SLURM) vs {b!r} (local)")


def _compare_results(slurm_results: Path, local_results: Path) -> None:
    """Same files; same summary.json and metrics.json contents (numbers within TOLERANCE)."""
    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*")
                if p.is_file() and not UNCOMPARED_DIRS & set(p.relative_to(root).parts[:-1])}

    assert files(slurm_results) == files(local_results), (
        "the runs wrote different files: only SLURM "
        f"{sorted(files(slurm_results) - files(local_results))}, only local "
        f"{sorted(files(local_results) - files(slurm_results))}")
    problems: list[str] = []
    compared = [Path("summary.json"), *sorted(
        p.relative_to(local_results) for p in local_results.glob("*/eval/**/metrics.json"))]
    for rel in compared:
        _compare(json.loads((slurm_results / rel).read_text()),
                 json.loads((local_results / rel).read_text()), str(rel), problems)
    assert not problems, ("SLURM and local results differ:\n" + "\n".join(problems[:50]))


def test_toy_workflow_runs_through_slurm(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    slurm_results, slurm_output = _run("slurm", TOY_SNAKEFILE, [], tmp_path, slurm_cluster)
    slurm_ids = _check_jobs_went_through_slurm(slurm_cluster, slurm_output)
    # The jobs themselves saw the SLURM job ids that squeue lists for this run.
    summary = json.loads((slurm_results / "summary.json").read_text())
    ran_under = set(summary["slurm_job_ids"].values())
    assert ran_under <= slurm_ids and "" not in ran_under, (ran_under, slurm_ids)

    local_results, local_output = _run("local", TOY_SNAKEFILE, [], tmp_path, slurm_cluster)
    local_summary = json.loads((local_results / "summary.json").read_text())
    assert set(local_summary["slurm_job_ids"].values()) == {""}
    _check_same_jobs(slurm_output, local_output)
    _compare_results(slurm_results, local_results)


def test_demo_pipeline_through_slurm_matches_local(slurm_cluster: SlurmCluster,
                                                   tmp_path: Path) -> None:
    assert SNAKEFILE.is_file() and TINY_CONFIG.is_file(), f"{SNAKEFILE} or {TINY_CONFIG} is missing"
    # the reduced demo without its shifted stages and learning curve (the local end-to-end test
    # runs those): their jobs are ordinary capsmed calls, and CI's time goes to SLURM's mechanics
    lean = tmp_path / "lean.yaml"  # merged over the tiny config (Snakemake merges configfiles)
    lean.write_text("shift: {enabled: false}\ndatasets:\n  demo_cls2d: {train: {fractions: []}}\n")
    args = ["--configfile", str(TINY_CONFIG), str(lean)]
    slurm_results, slurm_output = _run("slurm", SNAKEFILE, args, tmp_path, slurm_cluster)
    _check_jobs_went_through_slurm(slurm_cluster, slurm_output)
    summary = json.loads((slurm_results / "summary.json").read_text())
    assert summary["datasets"], "summary.json lists no dataset"

    local_results, local_output = _run("local", SNAKEFILE, args, tmp_path, slurm_cluster)
    _check_same_jobs(slurm_output, local_output)
    _compare_results(slurm_results, local_results)


DDP_CONFIG = REPO / "tests" / "workflow" / "ddp_config.yaml"


def test_a_two_process_training_job_is_one_task_running_torchrun(slurm_cluster: SlurmCluster,
                                                                  tmp_path: Path) -> None:
    """train.processes 2: the train rule is ONE SLURM job of one task with 2 CPUs (2 x threads),
    inside which torchrun starts the 2 training processes (never 2 tasks each starting torchrun,
    the SLURM plugin's pitfall #316 / #459); rank 0 alone writes the record and the log."""
    workdir = tmp_path / "slurm"
    workdir.mkdir()
    results = workdir / "results"
    target = results / "ddp_cls2d" / "models" / "seed_cnn" / "train.json"
    common = ["--snakefile", str(SNAKEFILE), "--configfile", str(DDP_CONFIG),
              "--config", f"results={results}"]
    # the data locally (a SLURM job costs ~30 s of start-up here); the training through SLURM
    _run_snakemake([*common, "--cores", "2", str(results / "ddp_cls2d" / "splits.json"),
                    str(results / "ddp_cls2d" / "preprocessed" / "plan.json")],
                   workdir=workdir, env=_client_env(), log_name="snakemake-ddp-data")
    args = [*common, "--profile", str(PROFILE), "--slurm-init-seconds-before-status-checks",
            str(INIT_DELAY), str(target)]
    output = _run_snakemake(args, workdir=workdir, env=slurm_cluster.env,
                            log_name="snakemake-ddp", cluster=slurm_cluster)
    _check_jobs_went_through_slurm(slurm_cluster, output)
    assert re.findall(r"^rule (\w+):", output, re.MULTILINE) == ["train"], output
    train_job = re.search(r"^rule train:.*?^Job \d+ has been submitted with SLURM jobid (\d+)",
                          output, re.MULTILINE | re.DOTALL)
    assert train_job, "no train job was submitted"
    job = slurm_cluster.query("scontrol", "show", "job", train_job.group(1))
    assert re.search(r"\bNumTasks=1\b", job), job
    assert re.search(r"\bNumCPUs=2\b", job), job
    assert "torch.distributed.run --standalone --nproc_per_node 2" in output
    record = json.loads(target.read_text())
    assert record["processes"] == 2 and record["stop_reason"] == "epochs"
    log = (workdir / "results" / "ddp_cls2d" / "logs" / "train_seed_cnn.log").read_text()
    assert "process 0 of 2" in log and "[rank 1]" not in log and "process 1 of 2" not in log
