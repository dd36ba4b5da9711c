#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, chvkit authors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: chvkit_setup
short_description: Converge a host for Cloud Hypervisor microVMs with chvkit, or undo it
version_added: "0.1.0"
description:
  - Runs C(chvkit setup --json) on the target (C(chvkit teardown --json) with O(state=absent))
    and reports what it changed, item by item, from chvkit's own report.
  - Setup installs the Cloud Hypervisor binary and firmware (checksummed), creates the guest
    bridge, sets the IPv6 sysctls, loads chvkit's firewall rules and writes the boot-time files.
    Teardown removes exactly what setup recorded and restores the sysctls it changed.
  - chvkit plans before it applies. In check mode the module runs C(--dry-run) and reports the
    plan without changing anything; in diff mode the plan (or what was applied) is shown as the
    difference between what chvkit found and what it does.
  - A converged host plans nothing, so a second run reports C(changed=false).
options:
  state:
    description:
      - V(present) runs C(chvkit setup).
      - V(absent) runs C(chvkit teardown), which works from setup's state file only, so
        O(artifacts_from), O(firewall) and O(scope) do not apply to it.
    type: str
    choices: [present, absent]
    default: present
  root:
    description:
      - Prefix for every file chvkit reads or writes (C(--root)), that is the artifacts, the
        sysctl.d drop-in, the nft file, the systemd unit, the lock and the state. Networking is
        not prefixed.
      - For image builders and tests; unset means the host's own C(/).
    type: path
  artifacts_from:
    description:
      - An artifacts mirror, as a URL or a directory on the target (C(--artifacts-from)). Each
        artifact is looked up under the last path segment of its profile URL and still checked
        against its pin or lock-file hash.
    type: str
  firewall:
    description:
      - Firewall driver, overriding the profile's C(network.firewall) (C(--firewall)).
    type: str
    choices: [nftables, iptables]
  scope:
    description:
      - What setup converges. V(all) is everything; V(network) is the bridge, sysctls,
        firewall and boot-time files (C(--network-only)); V(artifacts) is the binary, the
        firmware and the guest kernel (C(--artifacts-only), which needs no E(CAP_NET_ADMIN)).
    type: str
    choices: [all, network, artifacts]
    default: all
  keep_artifacts:
    description:
      - With O(state=absent), leave the installed binary and firmware in place
        (C(--keep-artifacts)).
    type: bool
    default: false
extends_documentation_fragment:
  - chvkit.host.common
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Runs chvkit with C(--dry-run), which reads the host and changes nothing.
  diff_mode:
    support: full
  platform:
    platforms: posix
notes:
  - Needs root on the target (E(CAP_NET_ADMIN) for the network), as chvkit itself does.
  - One setup or teardown runs at a time on a host; chvkit refuses a second one while the
    first holds its state directory.
requirements:
  - chvkit on the target (the C(chvkit.host.chvkit) role installs it).
seealso:
  - module: chvkit.host.chvkit_doctor
author:
  - chvkit authors (@chvkit)
'''

EXAMPLES = r'''
- name: Converge the host to chvkit's embedded profile
  chvkit.host.chvkit_setup:

- name: Converge from an offline mirror with a profile of our own, ip6tables rules
  chvkit.host.chvkit_setup:
    profile: /etc/chvkit/profile.yaml
    artifacts_from: /srv/mirror/chvkit
    firewall: iptables

- name: Only the network (what the boot-time unit does)
  chvkit.host.chvkit_setup:
    scope: network

- name: Undo everything setup did, keeping the downloaded artifacts
  chvkit.host.chvkit_setup:
    state: absent
    keep_artifacts: true
'''

RETURN = r'''
changed_items:
  description: Ids of the items that changed (in check mode, that would change), in order.
  returned: always
  type: list
  elements: str
  sample: [net.bridge, net.bridge_addr, net.firewall]
report:
  description: chvkit's JSON report, as it printed it (C(docs/setup.md) describes every field).
  returned: when chvkit printed one
  type: dict
  contains:
    command:
      description: C(setup) or C(teardown).
      type: str
      returned: always
      sample: setup
    dry_run:
      description: Whether this was a plan only (check mode).
      type: bool
      returned: always
      sample: false
    ok:
      description: Whether every item succeeded.
      type: bool
      returned: always
      sample: true
    changed:
      description: How many items changed.
      type: int
      returned: always
      sample: 3
    unchanged:
      description: How many items were already as wanted.
      type: int
      returned: always
      sample: 11
    planned:
      description: How many items a dry run would change.
      type: int
      returned: always
      sample: 0
    failed:
      description: How many items failed (setup stops at the first).
      type: int
      returned: always
      sample: 0
    items:
      description: One entry per item, with C(id), C(found), C(action), C(result) and C(detail).
      type: list
      elements: dict
      returned: always
    error:
      description: Why the run stopped, or null.
      type: str
      returned: always
    notes:
      description: Things worth saying that are not items.
      type: list
      elements: str
      returned: always
    state_file:
      description: Where setup records what it did (teardown's input).
      type: str
      returned: always
      sample: /var/lib/chvkit/setup-state.json
cmd:
  description: The chvkit command line that ran.
  returned: always
  type: list
  elements: str
  sample: [/usr/local/bin/chvkit, setup, --json]
rc:
  description: chvkit's exit code (0 success, 1 a failed item or a refused run, 2 usage or profile error).
  returned: always
  type: int
  sample: 0
chvkit_ms:
  description: Wall time of the chvkit process, in milliseconds.
  returned: always
  type: float
  sample: 21.4
chvkit_cpu_ms:
  description: CPU time (user plus system) of the chvkit process, in milliseconds.
  returned: always
  type: float
  sample: 9.8
module_ms:
  description:
    - The module's own wall time in milliseconds, from its entry (after Ansible has unpacked and
      started it) to its result, chvkit included. What the play spends beyond that is Ansible's.
  returned: always
  type: float
  sample: 23.0
module_cpu_ms:
  description:
    - The module's own CPU time in milliseconds over the same span, chvkit's included. Unlike
      RV(module_ms) it does not grow while the module waits for a CPU on a busy host.
  returned: always
  type: float
  sample: 12.1
stderr:
  description: What chvkit wrote to stderr (warnings, download progress, errors).
  returned: always
  type: str
  sample: ''
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.chvkit.host.plugins.module_utils.chvkit import (
    COMMON_ARGS,
    Clock,
    global_args,
    resolve_binary,
    run_json,
    timing_of,
)

# What an item's `result` is when it counts as a change: applied, or in a dry run planned.
CHANGING = ('changed', 'planned')


def build_argv(module, binary):
    p = module.params
    argv = [binary] + global_args(module)
    if p['state'] == 'present':
        argv += ['setup', '--json']
        if p['artifacts_from']:
            argv += ['--artifacts-from', p['artifacts_from']]
        if p['firewall']:
            argv += ['--firewall', p['firewall']]
        if p['scope'] == 'network':
            argv.append('--network-only')
        elif p['scope'] == 'artifacts':
            argv.append('--artifacts-only')
    else:
        argv += ['teardown', '--json']
        if p['keep_artifacts']:
            argv.append('--keep-artifacts')
    if module.check_mode:
        argv.append('--dry-run')
    return argv


def item_line(item, text):
    return '%s: %s\n' % (item.get('id', '?'), text)


def report_diff(report):
    """What was found against what is (or would be) done, one line per item.

    Unchanged items read the same on both sides, so the diff shows exactly the items that
    change, with chvkit's own words for the before and the after.
    """
    before, after = [], []
    for item in report.get('items') or []:
        found = item.get('found') or ''
        before.append(item_line(item, found))
        result = item.get('result')
        if result in CHANGING:
            after.append(item_line(item, item.get('action') or item.get('detail') or found))
        elif result == 'failed':
            after.append(item_line(item, 'FAILED: %s' % (item.get('detail') or '')))
        elif result == 'not_run':
            after.append(item_line(item, 'not run: %s' % (item.get('action') or '')))
        else:
            after.append(item_line(item, found))
    command = report.get('command', 'chvkit')
    return dict(
        before=''.join(before),
        after=''.join(after),
        before_header='%s: found' % command,
        after_header='%s: %s' % (command, 'planned' if report.get('dry_run') else 'applied'),
    )


def main():
    clock = Clock()
    argument_spec = dict(
        state=dict(type='str', default='present', choices=['present', 'absent']),
        artifacts_from=dict(type='str'),
        firewall=dict(type='str', choices=['nftables', 'iptables']),
        scope=dict(type='str', default='all', choices=['all', 'network', 'artifacts']),
        keep_artifacts=dict(type='bool', default=False),
    )
    argument_spec.update(COMMON_ARGS)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)

    argv = build_argv(module, resolve_binary(module))
    rc, report, out, err, chvkit_timing = run_json(module, argv)
    verb = argv[argv.index('--json') - 1]
    result = dict(cmd=argv, rc=rc, stderr=err, changed_items=[])
    if report is None:
        result.update(timing_of(clock, chvkit_timing))
        module.fail_json(
            msg='chvkit %s exited %d without a report: %s' % (verb, rc, (err or out).strip()),
            stdout=out,
            **result
        )

    result['changed_items'] = [
        i.get('id') for i in report.get('items') or [] if i.get('result') in CHANGING
    ]
    result['report'] = report
    # A failed run can still have changed items before it stopped: say so.
    result['changed'] = bool(result['changed_items'])
    if module._diff:
        result['diff'] = report_diff(report)
    result.update(timing_of(clock, chvkit_timing))
    if rc != 0 or not report.get('ok', False):
        module.fail_json(
            msg='chvkit %s: %s' % (verb, report.get('error') or 'exited %d' % rc),
            **result
        )
    module.exit_json(**result)


if __name__ == '__main__':
    main()
