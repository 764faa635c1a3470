"""Run the CLI with stderr on a real terminal (a pty), to see what users see: tqdm draws its bars only there."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios


def stderr_on_a_terminal(*argv: str, columns: int = 100) -> str:
    """`recipe ARGV...` in a subprocess whose stderr is a pty `columns` wide; what it drew there. The command must
    succeed."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))  # a new pty is 0 columns wide
    child = subprocess.Popen([sys.executable, "-m", "recipekit.engine.cli", *argv], stderr=follower,
                             stdout=subprocess.DEVNULL)
    os.close(follower)  # the child holds the terminal now; reading it ends when the child exits
    text = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        text += chunk
    os.close(leader)
    assert child.wait() == 0, text
    return text.decode()
