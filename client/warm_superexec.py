"""A site's SuperExec whose ClientApp processes start warm: forked from a server that already imported torch and fedus.

Flower's default (`--isolation subprocess`) starts a fresh `flwr-clientapp` per message; on
a 2-core site its imports (torch, timm, fedus) cost several seconds of every round
(bench/round_overhead.py). With `--isolation process` Flower lets the site run its own
SuperExec: this is Flower's (`flower-superexec`: same flags, task polling, auth and
heartbeats) with one change, its executor. Each ClientApp task still gets its own process
(a crash ends only that task) and still loads the run's ClientApp from the run's FAB, as
`flwr-clientapp` does; the process is forked from a `multiprocessing` forkserver that
imported the heavy libraries once, before any task and before any thread or CUDA context.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

# What the fedus ClientApp imports (client/app.py); the app's own modules (client.*, server.*) come from the FAB.
PRELOAD = ["torch", "timm", "numpy", "fedus.site", "fedus.privacy", "fedus.coreset", "fedus.transfer",
           "flwr.clientapp", "flwr.client.mod", "flwr.supernode.runtime.run_clientapp"]
APP_PACKAGES = ("client", "server")


def forget_app_modules() -> None:
    """This module came from the installed `client` package; the run's ClientApp (client.app, server.*) must be
    imported from the run's FAB, which Flower's loader puts first on sys.path, as in a fresh `flwr-clientapp`."""
    for name in [m for m in sys.modules if m.split(".")[0] in APP_PACKAGES]:
        del sys.modules[name]


def _run_task(address: str, token: str, insecure: bool, certificates: bytes | None, parent_pid: int | None,
              runtime_dependency_install: bool) -> None:
    """Body of one ClientApp task process: what `flwr-clientapp --token ...` runs."""
    forget_app_modules()
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    run_clientapp(runtime_api_address=address, token=token, insecure=insecure, certificates=certificates,
                  parent_pid=parent_pid, runtime_dependency_install=runtime_dependency_install)


def warm_executor():
    """Flower's SubprocessExecutor, except that ClientApp tasks fork from the preloaded forkserver."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    class WarmExecutor(SubprocessExecutor):
        def __init__(self) -> None:
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(PRELOAD)
            self._running: list = []

        def launch(self, spec: ExecutionSpec) -> LaunchResult:
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            certificates = validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure)
            task = self._context.Process(
                target=_run_task, name=f"flwr-clientapp-{spec.task_id}",
                args=(spec.runtime_api_address, spec.token, spec.insecure, certificates, spec.parent_pid,
                      spec.runtime_dependency_install))
            try:
                task.start()
            except OSError as err:
                return LaunchResult.failed(f"could not fork a ClientApp process: {err}")
            self._running.append(task)
            return LaunchResult.accepted()

        def reconcile(self) -> None:
            """Reap ended task processes (no zombies over a days-long run)."""
            for task in [t for t in self._running if not t.is_alive()]:
                self._running.remove(task)
                task.close()

        def close(self) -> None:
            for task in self._running:
                task.terminate()
            for task in self._running:
                task.join(5)
                if task.is_alive():
                    task.kill()

    return WarmExecutor()


def main() -> None:
    try:
        from flwr.supercore.cli.flower_superexec import flower_superexec
        from flwr.supercore.superexec import run_superexec as superexec_loop

        superexec_loop.get_executor  # noqa: B018 - the executor hook (Flower >= 1.42)
    except (ImportError, AttributeError):  # an older Flower: its own SuperExec, a fresh process per task
        os.execvp("flower-superexec", ["flower-superexec", *sys.argv[1:]])
    superexec_loop.get_executor = lambda *args, **kwargs: warm_executor()
    flower_superexec()


if __name__ == "__main__":  # run as `python -m client.warm_superexec`: task bodies must pickle by module name
    from client.warm_superexec import main as module_main

    module_main()
