"""One stage of the system as a CloudFormation stack: camera → API Gateway → Lambda → DynamoDB + S3.

What is shared with ``serving/`` is imported, never restated, so the stack follows the code:

* the table's key schema, attribute types, GSI and billing mode come from
  :data:`serving.storage.TABLE_SCHEMA` (tests compare the synthesized table with it);
* the API's routes come from :data:`serving.routes.ROUTES`, the routes the handler serves
  locally, so a new route there appears here (with IAM auth) on the next synth;
* the function's environment uses the variable names the handler reads (``RESULTS_TABLE``,
  ``RESULTS_BUCKET``, ``RESULTS_PREFIX``, ``MAX_BODY_BYTES`` ...).

Design decisions (see docs/deploy.md):

* **Auth: IAM (SigV4) on every method** of a REST API. A camera is an IAM user at
  :data:`serving.identity.CAMERA_PATH` named by its camera id (``python -m infra.cameras add``); the
  ``CameraWriterPolicy`` lets such a user ``POST`` to ``cameras/${aws:username}/images`` only, so a
  camera's key cannot upload as another camera (the handler checks the same binding). Reading
  results is a separate ``ResultsReaderPolicy`` for people and services, never for cameras.
  REST rather than HTTP API because it has explicit binary media types and per-method stage
  throttling settings, and hands the handler the v1 events it already parses; both cost nothing idle.
* **Attribution:** API Gateway writes one JSON access-log line per request (request id, caller ARN,
  access key, source IP, route, status, latency) to its own log group (``access_log_retention_days``).
* **Overload is 429:** the stage throttle is derived from reserved concurrency
  (``StageConfig.stage_throttle``), so API Gateway refuses the excess before Lambda throttles it.
* The image is referenced in ECR by tag or digest (``DockerImageCode.from_ecr``): synth never builds.
* The stack needs no CDK bootstrap (``BootstraplessSynthesizer``: no assets), so the template can be
  deployed by plain CloudFormation (``infra.deploy``) without ``cdk bootstrap``.
* Nothing is billed while idle except storage, CloudWatch alarms/dashboard and, when set,
  provisioned concurrency (figures in docs/benchmarks.md).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_cloudwatch as cw
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subs
from constructs import Construct

from infra.cameras import CAMERA_WRITER_POLICY_ID
from infra.config import StageConfig
from serving.identity import CAMERA_PATH
from serving.routes import ROUTES, SCORE_ROUTE
from serving.storage import TABLE_SCHEMA, TTL_ATTRIBUTE

# Where the Dockerfile puts the promoted model (${LAMBDA_TASK_ROOT}/serving/model).
IMAGE_MODEL_DIR = "/var/task/serving/model"
# Binary bodies API Gateway must base64-encode for the handler (serving.events.IMAGE_CONTENT_TYPES).
BINARY_MEDIA_TYPES = ("image/jpeg", "image/jpg", "image/png")
# S3 objects outlive their DynamoDB item by this much: DynamoDB TTL deletes lazily (typically
# within days), and a record must never point at an object lifecycle already removed.
S3_EXPIRY_GRACE_DAYS = 7

# One access-log line per request, as JSON (CloudWatch Logs Insights parses it). Who: the caller's ARN
# (for a camera: .../user/visual-inspection/cameras/<camera id>), its access key and source IP; what:
# method, route (resourcePath) and path; outcome: status, latencies, API Gateway's error message.
# Numeric fields are unquoted so Insights can filter ``status >= 500`` or sort by latency.
ACCESS_LOG_FIELDS: dict[str, str] = {
    "requestId": "$context.requestId",
    "extendedRequestId": "$context.extendedRequestId",
    "requestTime": "$context.requestTimeEpoch",
    "caller": "$context.identity.caller",
    "user": "$context.identity.user",
    "userArn": "$context.identity.userArn",
    "accessKey": "$context.identity.accessKey",
    "sourceIp": "$context.identity.sourceIp",
    "userAgent": "$context.identity.userAgent",
    "httpMethod": "$context.httpMethod",
    "resourcePath": "$context.resourcePath",
    "path": "$context.path",
    "status": "$context.status",
    "responseLength": "$context.responseLength",
    "responseLatency": "$context.responseLatency",
    "integrationLatency": "$context.integrationLatency",
    "integrationStatus": "$context.integrationStatus",
    # Lambda's own request id: the handler's log lines for this request carry it (join key).
    "integrationRequestId": "$context.integration.requestId",
    "errorMessage": "$context.error.message",
}
_NUMERIC_LOG_FIELDS = frozenset({"requestTime", "status", "responseLength", "responseLatency"})
# CloudFormation's limit for a function's inline code (ZipFile).
MAX_INLINE_CODE_CHARS = 4096
RECONCILER_SOURCE = Path(__file__).with_name("reconciler.py")
# The IAM policy variable that names the signing IAM user; API Gateway's resource ARN holds the path.
USERNAME_VARIABLE = "${aws:username}"

_ATTRIBUTE_TYPES = {
    "S": dynamodb.AttributeType.STRING,
    "N": dynamodb.AttributeType.NUMBER,
    "B": dynamodb.AttributeType.BINARY,
}


def route_path_pattern(template: str, bind: dict[str, str] | None = None) -> str:
    """``/cameras/{camera_id}/images`` → ``/cameras/*/images`` (an execute-api ARN path).

    ``bind`` replaces named parameters instead of ``*`` (``{"camera_id": "${aws:username}"}``).
    """
    return re.sub(r"\{([^/}]+)\}", lambda m: (bind or {}).get(m.group(1), "*"), template)


def inline_source(path: Path = RECONCILER_SOURCE) -> str:
    """``path``'s code without docstrings and comments, for a function's inline ``ZipFile``.

    The tested module is what runs: only documentation is dropped (``ast`` round trip), and a
    module that outgrows CloudFormation's 4 KB inline limit fails the synth, not the deploy.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    source = ast.unparse(tree) + "\n"
    if len(source) > MAX_INLINE_CODE_CHARS:
        raise ValueError(f"{path.name} is {len(source)} characters without docstrings; inline code max 4096")
    return source


def access_log_format(fields: dict[str, str] = ACCESS_LOG_FIELDS) -> str:
    """The access-log line template: a JSON object, numbers unquoted (API Gateway fills ``$context``)."""
    parts = [
        f'"{name}":{value}' if name in _NUMERIC_LOG_FIELDS else f'"{name}":"{value}"'
        for name, value in fields.items()
    ]
    return "{" + ",".join(parts) + "}"


def table_keys(schema: dict[str, Any] = TABLE_SCHEMA) -> dict[str, Any]:
    """CDK keyword arguments (partition/sort key, billing) for a table with ``schema``'s keys."""
    types = {a["AttributeName"]: _ATTRIBUTE_TYPES[a["AttributeType"]] for a in schema["AttributeDefinitions"]}

    def keys(key_schema: list[dict[str, str]]) -> dict[str, dynamodb.Attribute]:
        out = {}
        for key in key_schema:
            name = "partition_key" if key["KeyType"] == "HASH" else "sort_key"
            out[name] = dynamodb.Attribute(name=key["AttributeName"], type=types[key["AttributeName"]])
        return out

    billing = {
        "PAY_PER_REQUEST": dynamodb.BillingMode.PAY_PER_REQUEST,
        "PROVISIONED": dynamodb.BillingMode.PROVISIONED,
    }[schema.get("BillingMode", "PAY_PER_REQUEST")]
    return {
        **keys(schema["KeySchema"]),
        "billing_mode": billing,
        "indexes": [
            {
                "index_name": gsi["IndexName"],
                **keys(gsi["KeySchema"]),
                "projection_type": dynamodb.ProjectionType[gsi["Projection"]["ProjectionType"]],
                "non_key_attributes": gsi["Projection"].get("NonKeyAttributes"),
            }
            for gsi in schema.get("GlobalSecondaryIndexes", [])
        ],
    }


class InspectionStack(cdk.Stack):
    """API, function, table, bucket, camera policy, alarms and dashboard for one stage."""

    def __init__(self, scope: Construct, config: StageConfig, **kwargs: Any) -> None:
        super().__init__(
            scope,
            config.stack_name,
            stack_name=config.stack_name,
            description=f"visual-inspection {config.stage}: API Gateway (IAM) -> Lambda (ONNX) -> "
            "DynamoDB + S3",
            synthesizer=cdk.BootstraplessSynthesizer(),
            termination_protection=config.termination_protection,
            **kwargs,
        )
        self.config = config
        cdk.Tags.of(self).add("project", config.ecr_repository)
        cdk.Tags.of(self).add("stage", config.stage)
        removal = cdk.RemovalPolicy.RETAIN if config.retain_data else cdk.RemovalPolicy.DESTROY

        self.table = self._table(removal)
        self.bucket = self._bucket(removal)
        self.log_group = logs.LogGroup(
            self,
            "FunctionLogs",
            retention=logs.RetentionDays.INFINITE,
            removal_policy=cdk.RemovalPolicy.DESTROY,
        )
        # RetentionDays members are named (ONE_WEEK ...); the day count is validated in config.
        log_cfn = self.log_group.node.default_child
        assert isinstance(log_cfn, logs.CfnLogGroup)
        log_cfn.retention_in_days = config.log_retention_days
        self.access_logs = logs.LogGroup(
            self, "ApiAccessLogs", retention=logs.RetentionDays.INFINITE, removal_policy=removal
        )
        access_cfn = self.access_logs.node.default_child
        assert isinstance(access_cfn, logs.CfnLogGroup)
        access_cfn.retention_in_days = config.access_log_retention_days
        self.role = self._role()
        self.function, self.alias = self._function()
        self.api = self._api()
        self.writer_policy, self.reader_policy = self._camera_policies()
        self.reconciler = self._reconciler() if config.reconcile_grace_hours else None
        self.alarm_topic = self._alarms_and_dashboard()

        self._output("ApiUrl", self.api.url, "base URL of the stage (append a route)")
        for method, template in ROUTES:
            self._output(
                f"Route{_pascal(method + template)}", f"{method} {self.api.url.rstrip('/')}{template}", ""
            )
        self._output("ResultsTable", self.table.table_name, "DynamoDB table of results")
        self._output("ResultsBucket", self.bucket.bucket_name, "S3 bucket of overlays")
        self._output("FunctionName", self.function.function_name, "Lambda function")
        self._output(
            "CameraWriterPolicyArn",
            self.writer_policy.managed_policy_arn,
            f"attached to camera users at {CAMERA_PATH} by `python -m infra.cameras add`",
        )
        self._output(
            "ResultsReaderPolicyArn", self.reader_policy.managed_policy_arn, "attach to who reads results"
        )
        self._output("AccessLogGroup", self.access_logs.log_group_name, "API access log (who called what)")
        self._output("AlarmTopicArn", self.alarm_topic.topic_arn, "subscribe whoever answers alarms")
        self._output("Image", config.image_reference, "ECR tag or digest the function runs")

    # -- data -------------------------------------------------------------------------------
    def _table(self, removal: cdk.RemovalPolicy) -> dynamodb.Table:
        keys = table_keys()
        indexes = keys.pop("indexes")
        table = dynamodb.Table(
            self,
            "Results",
            **keys,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            time_to_live_attribute=TTL_ATTRIBUTE if self.config.retention_days else None,
            removal_policy=removal,
        )
        for index in indexes:
            table.add_global_secondary_index(**{k: v for k, v in index.items() if v is not None})
        return table

    def _bucket(self, removal: cdk.RemovalPolicy) -> s3.Bucket:
        rules = [
            s3.LifecycleRule(
                id="abort-incomplete-uploads", abort_incomplete_multipart_upload_after=cdk.Duration.days(1)
            ),
            s3.LifecycleRule(id="expire-noncurrent", noncurrent_version_expiration=cdk.Duration.days(30)),
        ]
        if self.config.retention_days:
            rules.append(
                s3.LifecycleRule(
                    id="expire-results",
                    prefix=self.config.results_prefix,
                    expiration=cdk.Duration.days(self.config.retention_days + S3_EXPIRY_GRACE_DAYS),
                )
            )
        return s3.Bucket(
            self,
            "Overlays",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            versioned=self.config.retain_data,
            lifecycle_rules=rules,
            removal_policy=removal,
        )

    # -- compute ----------------------------------------------------------------------------
    def _role(self) -> iam.Role:
        """Execution role: its own log group, its own table (+ index), its own prefix; nothing else."""
        role = iam.Role(
            self,
            "FunctionRole",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description="visual-inspection scorer: own table, own S3 prefix, own log group only",
        )
        index_arns = [
            f"{self.table.table_arn}/index/{g['IndexName']}"
            for g in TABLE_SCHEMA.get("GlobalSecondaryIndexes", [])
        ]
        # UpdateItem: the store settles a put whose outcome was lost (a retried write) by updating
        # its own item; Query: the GET result routes list a camera's results on the time index.
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ResultsTable",
                actions=["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:Query"],
                resources=[self.table.table_arn, *index_arns],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ResultsObjects",
                actions=["s3:PutObject", "s3:GetObject", "s3:DeleteObject"],
                resources=[self.bucket.arn_for_objects(f"{self.config.results_prefix}*")],
            )
        )
        # Listing (to sweep objects a failed write left) is limited to keys under the prefix.
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ListOwnPrefix",
                actions=["s3:ListBucket"],
                resources=[self.bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": [f"{self.config.results_prefix}*"]}},
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="OwnLogGroup",
                actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                resources=[self.log_group.log_group_arn],
            )
        )
        return role

    def _function(self) -> tuple[lambda_.DockerImageFunction, lambda_.Alias]:
        c = self.config
        repository = ecr.Repository.from_repository_name(self, "ImageRepository", c.ecr_repository)
        environment = {
            "RESULTS_TABLE": self.table.table_name,
            "RESULTS_BUCKET": self.bucket.bucket_name,
            "RESULTS_PREFIX": c.results_prefix,
            "STORE_ORIGINAL": str(c.store_original).lower(),
            "REQUIRE_CAMERA_ID": str(c.require_camera_id).lower(),
            "MAX_BODY_BYTES": str(c.max_body_bytes),
            "MODEL_DIR": IMAGE_MODEL_DIR,
            "POWERTOOLS_SERVICE_NAME": c.ecr_repository,
            "DEPLOY_STAGE": c.stage,
        }
        if c.retention_days:
            environment["RESULTS_TTL_DAYS"] = str(c.retention_days)
        function = lambda_.DockerImageFunction(
            self,
            "Function",
            code=lambda_.DockerImageCode.from_ecr(repository, tag_or_digest=c.image_reference),
            architecture=lambda_.Architecture.ARM_64
            if c.architecture == "arm64"
            else lambda_.Architecture.X86_64,
            memory_size=c.memory_mb,
            timeout=cdk.Duration.seconds(c.timeout_s),
            reserved_concurrent_executions=c.reserved_concurrency,
            role=self.role,
            log_group=self.log_group,
            logging_format=lambda_.LoggingFormat.JSON,
            environment=environment,
            description=f"visual-inspection scorer ({c.stage}, image {c.image_reference})",
        )
        self._depend_on_policy_only(function, self.role)
        # API Gateway calls the alias, so provisioned concurrency (when set) covers every request.
        alias = lambda_.Alias(
            self,
            "Live",
            alias_name="live",
            version=function.current_version,
            provisioned_concurrent_executions=c.provisioned_concurrency or None,
        )
        return function, alias

    def _depend_on_policy_only(self, function: lambda_.Function, role: iam.Role) -> None:
        """CDK makes a function depend on both its role and the role's policy; the role is already
        implied by Fn::GetAtt (cfn-lint W3005), so keep only the policy (the function must not
        start before it may write)."""
        cfn_function = function.node.default_child
        default_policy = role.node.try_find_child("DefaultPolicy")
        assert isinstance(cfn_function, lambda_.CfnFunction) and isinstance(default_policy, iam.Policy)
        cfn_function.add_override("DependsOn", [self.get_logical_id(default_policy.node.default_child)])

    def _reconciler(self) -> lambda_.Function:
        """The scheduled orphan-object sweep (infra/reconciler.py): list + delete under the prefix,
        read items in batches; one instance at a time; its own role and log group."""
        c = self.config
        log_group = logs.LogGroup(
            self,
            "ReconcilerLogs",
            retention=logs.RetentionDays.INFINITE,
            removal_policy=cdk.RemovalPolicy.DESTROY,
        )
        log_cfn = log_group.node.default_child
        assert isinstance(log_cfn, logs.CfnLogGroup)
        log_cfn.retention_in_days = c.log_retention_days
        role = iam.Role(
            self,
            "ReconcilerRole",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description="visual-inspection reconciler: list/delete own prefix, read own table, own logs",
        )
        own_objects = self.bucket.arn_for_objects(f"{c.results_prefix}*")
        statements = [
            ("ReadItems", ["dynamodb:BatchGetItem"], [self.table.table_arn], None),
            ("ListOwnPrefix", ["s3:ListBucket"], [self.bucket.bucket_arn],
             {"StringLike": {"s3:prefix": [f"{c.results_prefix}*"]}}),
            ("DeleteOrphans", ["s3:DeleteObject"], [own_objects], None),
            ("OwnLogGroup", ["logs:CreateLogStream", "logs:PutLogEvents"], [log_group.log_group_arn], None),
        ]  # fmt: skip
        for sid, actions, resources, conditions in statements:
            role.add_to_policy(
                iam.PolicyStatement(sid=sid, actions=actions, resources=resources, conditions=conditions)
            )
        function = lambda_.Function(
            self,
            "Reconciler",
            runtime=lambda_.Runtime.PYTHON_3_14,  # the newest the CDK knows (cdk-nag AwsSolutions-L1)
            handler="index.handler",
            code=lambda_.Code.from_inline(inline_source()),
            timeout=cdk.Duration.minutes(15),
            memory_size=256,
            reserved_concurrent_executions=1,
            role=role,
            log_group=log_group,
            environment={
                "RESULTS_TABLE": self.table.table_name,
                "RESULTS_BUCKET": self.bucket.bucket_name,
                "RESULTS_PREFIX": c.results_prefix,
                "GRACE_HOURS": f"{c.reconcile_grace_hours:g}",
                "DEPLOY_STAGE": c.stage,
            },
            description=f"visual-inspection reconciler ({c.stage}): delete result objects no item references",
        )
        self._depend_on_policy_only(function, role)
        events.Rule(
            self,
            "ReconcileSchedule",
            description=f"run the reconciler every {c.reconcile_every_hours} h",
            schedule=events.Schedule.rate(cdk.Duration.hours(c.reconcile_every_hours)),
            targets=[targets.LambdaFunction(function, retry_attempts=0)],
        )
        return function

    # -- API --------------------------------------------------------------------------------
    def _api(self) -> apigw.RestApi:
        c = self.config
        api = apigw.RestApi(
            self,
            "Api",
            rest_api_name=c.stack_name,
            description="Camera uploads; every method requires SigV4 (IAM) signatures",
            binary_media_types=list(BINARY_MEDIA_TYPES),
            endpoint_types=[apigw.EndpointType.REGIONAL],
            # Access logging needs the account-wide API Gateway → CloudWatch Logs role; the knob
            # creates it (kept on stack deletion: another stage's logging depends on it too).
            cloud_watch_role=c.api_cloudwatch_role,
            cloud_watch_role_removal_policy=cdk.RemovalPolicy.RETAIN if c.api_cloudwatch_role else None,
            deploy_options=apigw.StageOptions(
                stage_name=c.stage,
                throttling_rate_limit=c.stage_throttle[0],
                throttling_burst_limit=c.stage_throttle[1],
                access_log_destination=apigw.LogGroupLogDestination(self.access_logs),
                access_log_format=apigw.AccessLogFormat.custom(access_log_format()),
            ),
            default_method_options=apigw.MethodOptions(authorization_type=apigw.AuthorizationType.IAM),
        )
        integration = apigw.LambdaIntegration(self.alias, proxy=True, allow_test_invoke=False)
        for method, template in ROUTES:
            resource = api.root.resource_for_path(template.strip("/"))
            resource.add_method(method, integration, authorization_type=apigw.AuthorizationType.IAM)
        return api

    def _camera_policies(self) -> tuple[iam.ManagedPolicy, iam.ManagedPolicy]:
        """Writer: a camera user posts images for its own camera id only. Reader: the GET routes.

        ``${aws:username}`` is the signing IAM user's name, which the provisioning command makes the
        camera id, and the condition limits the grant to users under the camera path, so the policy
        attached anywhere else grants nothing.
        """
        stage = self.config.stage
        method, template = SCORE_ROUTE
        own_images = route_path_pattern(template, {"camera_id": USERNAME_VARIABLE})
        writer = iam.ManagedPolicy(
            self,
            CAMERA_WRITER_POLICY_ID,
            description=f"visual-inspection {stage}: a camera user uploads images as its own camera id",
            statements=[
                iam.PolicyStatement(
                    sid="PostOwnCameraImages",
                    actions=["execute-api:Invoke"],
                    resources=[self.api.arn_for_execute_api(method, own_images, stage)],
                    conditions={
                        "ArnLike": {
                            "aws:PrincipalArn": f"arn:{self.partition}:iam::{self.account}:user{CAMERA_PATH}*"
                        }
                    },
                )
            ],
        )
        reader = iam.ManagedPolicy(
            self,
            "ResultsReaderPolicy",
            description=f"visual-inspection {stage}: read results (GET routes); not for cameras",
            statements=[
                iam.PolicyStatement(
                    sid="ReadResults",
                    actions=["execute-api:Invoke"],
                    resources=[
                        self.api.arn_for_execute_api(verb, route_path_pattern(path), stage)
                        for verb, path in ROUTES
                        if verb == "GET"
                    ],
                )
            ],
        )
        # A fixed logical id: the provisioning command finds the writer policy by it in the stack.
        writer_cfn = writer.node.default_child
        assert isinstance(writer_cfn, iam.CfnManagedPolicy)
        writer_cfn.override_logical_id(CAMERA_WRITER_POLICY_ID)
        return writer, reader

    # -- operations -------------------------------------------------------------------------
    def _alarms_and_dashboard(self) -> sns.Topic:
        """Alarms that notify a topic that always exists (e-mail optional), and the dashboard.

        The 5xx alarm is a rate only over a period with at least ``alarm_5xx_min_requests``
        requests: one failed request in a quiet five minutes is a 100 % rate, not an outage.
        """
        c = self.config
        period = cdk.Duration.minutes(5)
        server_errors = cw.MathExpression(
            expression=f"IF(requests >= {c.alarm_5xx_min_requests}, FILL(errors, 0) / requests, 0)",
            using_metrics={
                "requests": self.api.metric_count(period=period, statistic="Sum"),
                "errors": self.api.metric_server_error(period=period, statistic="Sum"),
            },
            period=period,
            label=f"5xx rate (periods with >= {c.alarm_5xx_min_requests} requests)",
        )
        latency_p95 = self.api.metric_latency(period=period, statistic="p95", label="p95 latency (ms)")
        throttles = self.function.metric_throttles(period=period, statistic="Sum", label="Lambda throttles")
        above, at_least = (
            cw.ComparisonOperator.GREATER_THAN_THRESHOLD,
            cw.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
        )
        # (id, metric, threshold, 5-minute periods, comparison, what it means to the person paged)
        specs = [
            ("Api5xxRate", server_errors, c.alarm_5xx_rate, 1, above,
             f"more than {c.alarm_5xx_rate:.1%} of requests answered 5xx in 5 minutes "
             f"(with at least {c.alarm_5xx_min_requests} requests)"),
            ("ApiLatencyP95", latency_p95, c.alarm_p95_latency_ms, 2, above,
             f"p95 latency above {c.alarm_p95_latency_ms:g} ms for 10 minutes"),
            ("FunctionThrottles", throttles, c.alarm_throttles, 1, at_least,
             "the function hit its reserved concurrency (raise reserved_concurrency)"),
        ]  # fmt: skip
        alarms = [
            cw.Alarm(
                self,
                alarm_id,
                metric=metric,
                threshold=threshold,
                evaluation_periods=periods,
                comparison_operator=comparison,
                treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
                alarm_description=description,
            )
            for alarm_id, metric, threshold, periods, comparison, description in specs
        ]
        topic = sns.Topic(self, "AlarmTopic", display_name=f"{c.stack_name} alarms", enforce_ssl=True)
        if c.alarm_email:
            topic.add_subscription(subs.EmailSubscription(c.alarm_email))
        for alarm in alarms:
            alarm.add_alarm_action(cw_actions.SnsAction(topic))
            alarm.add_ok_action(cw_actions.SnsAction(topic))

        dashboard = cw.Dashboard(self, "Dashboard", dashboard_name=c.stack_name)
        dashboard.add_widgets(
            cw.GraphWidget(
                title="Requests",
                left=[
                    self.api.metric_count(period=period, statistic="Sum", label="requests"),
                    self.api.metric_client_error(period=period, statistic="Sum", label="4xx"),
                    self.api.metric_server_error(period=period, statistic="Sum", label="5xx"),
                ],
            ),
            cw.GraphWidget(
                title="Latency (ms)",
                left=[
                    self.api.metric_latency(period=period, statistic="p50", label="API p50"),
                    latency_p95,
                    self.function.metric_duration(period=period, statistic="p95", label="Lambda p95"),
                ],
            ),
            cw.GraphWidget(
                title="Lambda",
                left=[
                    self.function.metric_invocations(period=period, statistic="Sum", label="invocations"),
                    self.function.metric_errors(period=period, statistic="Sum", label="errors"),
                    throttles,
                ],
            ),
        )
        dashboard.add_widgets(cw.AlarmStatusWidget(title="Alarms", alarms=alarms, width=24))
        return topic

    def _output(self, name: str, value: str, description: str) -> None:
        cdk.CfnOutput(self, name, value=value, description=description or None)


def _pascal(text: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", text) if part)
