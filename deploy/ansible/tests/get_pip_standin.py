"""Stand-in for the get-pip.py that ansible-test bootstraps pip into its sanity venvs with.

ansible-test creates each sanity virtual environment without pip and runs a get-pip.py it
downloads from ci-files.testing.ansible.com, which this machine cannot reach (only PyPI). It
caches that script as ~/.ansible/test/cache/get_pip_<version>.py and runs it as a module with
pip's install arguments plus get-pip's own --no-setuptools/--no-wheel. This file, copied there by
scripts/test-ansible.sh next to the pip wheel of that version (downloaded from PyPI with pip),
does what get-pip.py does: run pip from the wheel to install the requested packages.
"""

import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = os.path.splitext(os.path.basename(__file__))[0][len('get_pip_'):].replace('_', '.')


def main():
    wheels = glob.glob(os.path.join(HERE, 'pip-%s-*.whl' % VERSION))
    if not wheels:
        sys.exit('no pip %s wheel beside %s' % (VERSION, __file__))
    # pip runs from its wheel (a zip on sys.path), as get-pip.py runs it from its embedded copy.
    sys.path.insert(0, wheels[0])
    from pip._internal.cli.main import main as pip_main  # pylint: disable=import-outside-toplevel

    # get-pip's own flags: setuptools and wheel are not added unless asked for, which they
    # never are here, so the flags have nothing to remove.
    args = [a for a in sys.argv[1:] if a not in ('--no-setuptools', '--no-wheel')]
    sys.exit(pip_main(['install', '--upgrade', '--force-reinstall', '--find-links', HERE] + args))


if __name__ == '__main__':
    main()
