"""The console script's own behaviour (not a command's)."""
import subprocess
import sys


def test_help_into_a_closed_pipe_is_not_an_error():
    # `jaxrl-entropy dryrun --help | head -1`: the reader may be gone before the help is written
    proc = subprocess.Popen([sys.executable, "-m", "jaxrl_entropy.cli", "dryrun", "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()   # the reader leaves at once
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_sigusr1_prints_every_threads_stack_and_the_process_goes_on():
    import subprocess
    import sys
    code = ("import importlib, os, signal, time; "
            "importlib.import_module('jaxrl_entropy.cli.main')._install_process_hooks(); "
            "os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.5); print('still running', flush=True)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "still running" in proc.stdout
    assert "Current thread" in proc.stderr and 'File "<string>"' in proc.stderr, proc.stderr


def test_process_hooks_install_under_a_captured_stderr(capsys):
    # the CLI runs in-process under pytest's capture (no fileno): the hooks must not fail there
    import importlib
    importlib.import_module("jaxrl_entropy.cli.main")._install_process_hooks()
