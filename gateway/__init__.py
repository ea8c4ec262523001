"""ftp-gateway: legacy FTP clients see an S3 bucket or a local disk as an FTP filesystem."""

__version__ = "0.1.0"
