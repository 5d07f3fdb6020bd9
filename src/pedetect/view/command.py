"""``pedetect view`` (Typer and pathlib only at import: ``--help`` stays fast)."""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from pedetect.console import fail

LOOPBACK = "127.0.0.1"


def serve_report(report_dir: Path, port: int = 0):
    """An HTTP server of ``report_dir``'s files on loopback only (``port`` 0: any free port), not
    yet serving: call ``serve_forever``. Its port is ``server.server_address[1]``."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, format, *args) -> None:  # a request line per slice would bury the URL
            pass

    handler = functools.partial(QuietHandler, directory=str(report_dir))
    return ThreadingHTTPServer((LOOPBACK, port), handler)


def view_command(
    report_dir: Path = typer.Argument(..., help="A report folder written by pedetect predict --report."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port on 127.0.0.1 (0: any free port)."),
) -> None:
    """Serve a prediction report on this machine only (127.0.0.1) and print its address; Ctrl-C stops.

    The report needs no server: its index.html opens from the file system as it is. This is for
    those who prefer a URL. Nothing is written.
    """
    if not (report_dir / "index.html").is_file():
        raise fail(f"{report_dir} is not a report folder: no index.html (write one with pedetect predict --report)")
    try:
        server = serve_report(report_dir, port)
    except OSError as error:
        raise fail(f"cannot listen on {LOOPBACK}:{port}: {error.strerror or error}") from None
    typer.echo(f"report: http://{LOOPBACK}:{server.server_address[1]}/index.html (Ctrl-C stops)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
