# -*- coding: utf-8 -*-
# Copyright: (c) 2026, chvkit authors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # The options every chvkit module takes (module_utils/chvkit.py's COMMON_ARGS), documented
    # once: which binary runs, and with which profile.
    DOCUMENTATION = r'''
options:
  binary:
    description:
      - The chvkit executable on the target. A name is looked up on E(PATH) and in
        C(/usr/local/bin); a value with a C(/) is used as the path itself.
    type: str
    default: chvkit
  profile:
    description:
      - Host profile (YAML) on the target, passed as C(--profile). Unset means the profile
        embedded in chvkit.
    type: path
'''
