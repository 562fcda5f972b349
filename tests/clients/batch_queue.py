"""Creates an AWS Batch job queue and job definition on a local moto server (the tests' stand-in
for AWS Batch) and prints their ARNs as JSON: {"queue": ARN, "definition": ARN}.

    python3 tests/clients/batch_queue.py http://127.0.0.1:PORT
"""
import json
import sys

import boto3

endpoint = sys.argv[1]
session = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
iam, batch = boto3.client("iam", **session), boto3.client("batch", **session)

role = iam.create_role(RoleName="batch-service", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
environment = batch.create_compute_environment(
    computeEnvironmentName="llm-training", type="UNMANAGED", state="ENABLED", serviceRole=role
)["computeEnvironmentArn"]
queue = batch.create_job_queue(
    jobQueueName="llm-training",
    state="ENABLED",
    priority=1,
    computeEnvironmentOrder=[{"order": 1, "computeEnvironment": environment}],
)["jobQueueArn"]
definition = batch.register_job_definition(
    jobDefinitionName="llm-training",
    type="container",
    containerProperties={
        "image": "llm-training:test",
        "command": ["--help"],
        "resourceRequirements": [{"type": "GPU", "value": "1"}, {"type": "VCPU", "value": "4"}, {"type": "MEMORY", "value": "15000"}],
    },
)["jobDefinitionArn"]
print(json.dumps({"queue": queue, "definition": definition}))
