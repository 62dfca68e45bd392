"""AWS CDK app for the serving side: one stack per stage (see :mod:`infra.stack`, docs/deploy.md).

jsii (the bridge from Python to the CDK's JavaScript) prints a large banner on every run when
Node is older than it likes; the machine's Node 20 works, so the banner is silenced here, before
``aws_cdk`` is first imported.
"""

import os

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
