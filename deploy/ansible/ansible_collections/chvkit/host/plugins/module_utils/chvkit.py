# -*- coding: utf-8 -*-
# Copyright: (c) 2026, chvkit authors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Shared by the chvkit modules: find the binary, build its command line, run it, read its JSON.

The modules add no host logic of their own: chvkit plans, applies and judges; the modules only
translate its JSON report into Ansible's result conventions. That keeps one implementation to
trust, and a module run costs little more than running chvkit by hand.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import resource
import time

# Options every chvkit module takes: which chvkit, which profile, which root.
COMMON_ARGS = dict(
    binary=dict(type='str', default='chvkit'),
    profile=dict(type='path'),
    root=dict(type='path'),
)


def resolve_binary(module):
    """The chvkit executable: a path as given, or a name looked up on PATH and /usr/local/bin."""
    binary = module.params['binary']
    if '/' in binary:
        if not os.path.isfile(binary) or not os.access(binary, os.X_OK):
            module.fail_json(msg='binary %s is not an executable file on this host' % binary)
        return binary
    # /usr/local/bin is where the role installs chvkit, and it is not always on a
    # non-interactive PATH.
    return module.get_bin_path(binary, required=True, opt_dirs=['/usr/local/bin'])


def global_args(module):
    """`--profile FILE --root DIR` as the options ask (chvkit's defaults otherwise)."""
    args = []
    if module.params['profile']:
        args += ['--profile', module.params['profile']]
    if module.params['root']:
        args += ['--root', module.params['root']]
    return args


def cpu_seconds(who):
    """User plus system CPU seconds of this process (RUSAGE_SELF) or its waited-for children."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class Clock:
    """Wall and CPU time since it was made.

    Both are reported because they answer different questions: wall time is what a play waits
    for, and on a busy host it includes waiting for a CPU (Ansible's own processes compete for
    it too); CPU time is what the work itself costs, whatever else the host is doing.
    """

    def __init__(self):
        self.wall = time.monotonic()
        self.cpu = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)

    def wall_ms(self):
        return round((time.monotonic() - self.wall) * 1000.0, 1)

    def cpu_ms(self):
        now = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)
        return round((now - self.cpu) * 1000.0, 1)


def run_json(module, argv):
    """Run chvkit and parse its JSON report.

    Returns (rc, report or None, stdout, stderr, timing). chvkit's exit code 1 still comes with
    a report (a failed item, a FAIL finding); only usage and profile errors (exit 2) come
    without one, and then stderr says why. timing has chvkit_ms (wall) and chvkit_cpu_ms.
    """
    children = cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    # NO_COLOR: chvkit never colours JSON, but its stderr warnings would otherwise carry escapes
    # into the task result when the target's stderr happens to be a terminal.
    rc, out, err = module.run_command(argv, environ_update={'NO_COLOR': '1'})
    timing = dict(
        chvkit_ms=round((time.monotonic() - started) * 1000.0, 1),
        chvkit_cpu_ms=round((cpu_seconds(resource.RUSAGE_CHILDREN) - children) * 1000.0, 1),
    )
    try:
        report = json.loads(out)
    except ValueError:
        report = None
    if not isinstance(report, dict):
        report = None
    return rc, report, out, err, timing


def timing_of(clock, chvkit_timing):
    """The timing fields of a result: chvkit's run and the module's own, chvkit included."""
    timing = dict(chvkit_timing)
    timing.update(module_ms=clock.wall_ms(), module_cpu_ms=clock.cpu_ms())
    return timing
