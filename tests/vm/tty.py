"""A real terminal for tests: tmux running a shell, driven by keys, read by screen."""

from __future__ import annotations

import os
import subprocess
import time


class Tmux:
    """A real terminal: tmux running a shell, driven by keys, read by screen."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        # A tmux server that is already running would give the shell its own (older)
        # environment: pass fcvm's settings explicitly.
        env = [f"{k}={v}" for k, v in os.environ.items() if k.startswith("FCVM_") or k == "PATH"]
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "100", "-y", "30",
                        *(a for kv in env for a in ("-e", kv)),
                        "env", "PS1=$ ", "bash", "--norc", "--noprofile"], check=True)  # fmt: skip

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared; screen:\n{self.screen()}")

    def resize(self, cols: int, rows: int) -> None:
        subprocess.run(["tmux", "resize-window", "-t", self.name, "-x", str(cols), "-y",
                        str(rows)], check=True)  # fmt: skip

    def check_resize_and_ctrl_c(self) -> None:
        """At a guest shell's prompt (a 100x30 terminal): a resize to 120x40 reaches the
        guest, and Ctrl-C interrupts the guest's foreground program, not fcvm."""
        self.resize(120, 40)
        time.sleep(0.5)
        self.send("clear; stty size", "Enter")
        self.wait_for("40 120")
        self.send("clear; sleep 100", "Enter")
        time.sleep(1.5)
        self.send("C-c")
        self.wait_for("^C")
        self.send("echo rc=$?", "Enter")
        self.wait_for("rc=130")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)
