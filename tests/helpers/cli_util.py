"""Running the qcow2fast command line inside the test process."""

from qcow2fast.cli import main


def run_cli(capsys, *argv):
    """``qcow2fast argv`` in-process: (exit status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err
