#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, chvkit authors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: chvkit_doctor
short_description: Check a host for Cloud Hypervisor microVMs with chvkit doctor
version_added: "0.1.0"
description:
  - Runs C(chvkit doctor --json) on the target (read-only) and returns every check as a fact,
    keyed by its stable id (C(kvm.usable), C(net.forwarding), ...), with its level (C(PASS),
    C(WARN), C(FAIL), C(SKIP)), summary, detail and the command that fixes it.
  - O(fail_on) decides which findings fail the task; the failure message names each of them
    with its fix.
options:
  root:
    description:
      - Prefix for every file chvkit reads (C(--root)), as given to M(chvkit.host.chvkit_setup).
    type: path
  only:
    description:
      - Run only the checks whose id is one of these or starts with one of them followed by
        C(.) (C(--only), e.g. V(net) or V(kvm.usable)). Empty means every check.
    type: list
    elements: str
    default: []
  fail_on:
    description:
      - V(fail) fails the task when any check is at C(FAIL); V(warn) also when any is at
        C(WARN); V(never) only reports.
    type: str
    choices: [fail, warn, never]
    default: fail
extends_documentation_fragment:
  - chvkit.host.common
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.facts
attributes:
  check_mode:
    support: full
    details: Doctor only reads the host; it runs the same in check mode.
  diff_mode:
    support: none
  facts:
    support: full
  platform:
    platforms: posix
notes:
  - Some checks read what only root may read (the firewall, other users' processes); run it
    with C(become=true) where the play does not already run as root.
requirements:
  - chvkit on the target (the C(chvkit.host.chvkit) role installs it).
seealso:
  - module: chvkit.host.chvkit_setup
author:
  - chvkit authors (@chvkit)
'''

EXAMPLES = r'''
- name: Check the host; fail the play on any FAIL
  chvkit.host.chvkit_doctor:

- name: Only the network checks, never failing; look at the facts afterwards
  chvkit.host.chvkit_doctor:
    only: [net]
    fail_on: never

- name: Say which hosts have IPv6 forwarding off
  ansible.builtin.debug:
    msg: "{{ ansible_facts.chvkit_doctor.checks['net.forwarding'].summary }}"
  when: ansible_facts.chvkit_doctor.checks['net.forwarding'].level == 'FAIL'
'''

RETURN = r'''
ansible_facts:
  description: Facts set for the host.
  returned: always
  type: dict
  contains:
    chvkit_doctor:
      description: The doctor report.
      returned: always
      type: dict
      contains:
        checks:
          description:
            - Every check that ran, keyed by id, in doctor's order. Each has C(level),
              C(summary), C(detail) and C(hint) (the fix; null for C(PASS)).
          returned: always
          type: dict
          sample:
            net.forwarding:
              level: FAIL
              summary: IPv6 forwarding is off
              detail: "net.ipv6.conf.all.forwarding=0: guests reach the gateway but nothing beyond it"
              hint: sysctl -w net.ipv6.conf.all.forwarding=1
        summary:
          description: How many checks are at each level.
          returned: always
          type: dict
          sample: {pass: 18, warn: 2, fail: 1, skip: 1}
        failed:
          description: Ids of the checks at C(FAIL).
          returned: always
          type: list
          elements: str
          sample: [net.forwarding]
        warned:
          description: Ids of the checks at C(WARN).
          returned: always
          type: list
          elements: str
          sample: [net.taps]
        profile:
          description: The profile doctor checked against.
          returned: always
          type: str
          sample: embedded default (profiles/default.yaml)
        root:
          description: The C(--root) prefix, or null.
          returned: always
          type: str
checks:
  description: The checks as doctor listed them (each with C(id)), for O(fail_on=never) users that register the result.
  returned: when doctor printed a report
  type: list
  elements: dict
cmd:
  description: The chvkit command line that ran.
  returned: always
  type: list
  elements: str
  sample: [/usr/local/bin/chvkit, doctor, --json]
chvkit_rc:
  description:
    - chvkit's exit code (0 no FAIL, 1 some FAIL, 2 usage or profile error).
    - Not called C(rc), which Ansible takes as failure whenever it is not 0; whether a FAIL
      fails the task is O(fail_on)'s to say.
  returned: always
  type: int
  sample: 1
chvkit_ms:
  description: Wall time of the chvkit process, in milliseconds.
  returned: always
  type: float
  sample: 35.2
chvkit_cpu_ms:
  description: CPU time (user plus system) of the chvkit process, in milliseconds.
  returned: always
  type: float
  sample: 20.3
module_ms:
  description: The module's own wall time in milliseconds, chvkit included.
  returned: always
  type: float
  sample: 37.9
module_cpu_ms:
  description: The module's own CPU time in milliseconds, chvkit's included.
  returned: always
  type: float
  sample: 23.5
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

# Which levels fail the task for each `fail_on`.
FAILING = dict(fail=('FAIL',), warn=('FAIL', 'WARN'), never=())


def facts_of(report):
    checks = {}
    for c in report.get('checks') or []:
        checks[c.get('id')] = dict(
            level=c.get('level'),
            summary=c.get('summary'),
            detail=c.get('detail'),
            hint=c.get('hint'),
        )
    return dict(
        checks=checks,
        summary=report.get('summary') or {},
        failed=[i for i, c in checks.items() if c['level'] == 'FAIL'],
        warned=[i for i, c in checks.items() if c['level'] == 'WARN'],
        profile=report.get('profile'),
        root=report.get('root'),
    )


def finding_text(check_id, check):
    text = '%s %s: %s' % (check_id, check['level'], check['summary'])
    if check.get('hint'):
        # The first line of the fix: enough to act on; the facts carry the rest.
        text += ' (fix: %s)' % check['hint'].splitlines()[0]
    return text


def main():
    clock = Clock()
    argument_spec = dict(
        only=dict(type='list', elements='str', default=[]),
        fail_on=dict(type='str', default='fail', choices=['fail', 'warn', 'never']),
    )
    argument_spec.update(COMMON_ARGS)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)

    argv = [resolve_binary(module)] + global_args(module) + ['doctor', '--json']
    for prefix in module.params['only']:
        argv += ['--only', prefix]
    rc, report, out, err, chvkit_timing = run_json(module, argv)
    result = dict(changed=False, cmd=argv, chvkit_rc=rc)
    # Exit 1 means "some check is at FAIL" and still carries the report; anything else
    # without a report (a bad profile or --only prefix: exit 2) is chvkit refusing to run.
    if report is None or rc not in (0, 1):
        result.update(timing_of(clock, chvkit_timing))
        module.fail_json(
            msg='chvkit doctor exited %d without a report: %s' % (rc, (err or out).strip()),
            stdout=out,
            stderr=err,
            **result
        )

    facts = facts_of(report)
    result['ansible_facts'] = dict(chvkit_doctor=facts)
    result['checks'] = report.get('checks') or []
    bad = [
        finding_text(i, c)
        for i, c in facts['checks'].items()
        if c['level'] in FAILING[module.params['fail_on']]
    ]
    result.update(timing_of(clock, chvkit_timing))
    if bad:
        module.fail_json(
            msg='chvkit doctor: %d finding(s) at or above fail_on=%s: %s'
            % (len(bad), module.params['fail_on'], '; '.join(bad)),
            **result
        )
    module.exit_json(**result)


if __name__ == '__main__':
    main()
