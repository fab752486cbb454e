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
