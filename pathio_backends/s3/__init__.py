"""The S3 backend (aiobotocore): ``s3://bucket/prefix`` seen as a directory tree.

``settings`` can be imported without aiobotocore (the configuration does); the other modules need it.
"""
