# ---------------------------------------------------------------------------------------------
# Naming and placement
# ---------------------------------------------------------------------------------------------

variable "name" {
  description = "Name of the fleet. It prefixes every resource, tags the instances (spotguard:fleet) and names the training service instance on each node."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{1,30}[a-z0-9]$", var.name))
    error_message = "The name must be 3-32 characters of lower-case letters, digits and hyphens, starting and ending with a letter or digit (it becomes part of bucket, role and unit names)."
  }
}

variable "vpc_id" {
  description = "ID of the VPC the subnets belong to. The module creates a security group there that admits traffic only from the fleet's own nodes."
  type        = string
}

variable "subnet_ids" {
  description = "Subnets to launch into, ideally one per Availability Zone: spreading across zones is what keeps spot capacity available."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "At least one subnet is needed."
  }
}

variable "additional_security_group_ids" {
  description = "Security groups to attach besides the module's own (for example one that admits SSH from a bastion, or EFA traffic)."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags for every resource the module creates, including the instances and volumes the fleet launches."
  type        = map(string)
  default     = {}
}

# ---------------------------------------------------------------------------------------------
# Capacity
# ---------------------------------------------------------------------------------------------

variable "instance_types" {
  description = "GPU instance types the fleet may use. Every type is paired with every subnet as an override, so more types and zones mean more spot pools to draw from. Leave empty to select by attributes (instance_requirements) instead."
  type        = list(string)
  default     = ["g5.xlarge", "g5.2xlarge", "g6.xlarge", "g6.2xlarge"]

  validation {
    condition     = length(var.instance_types) * length(var.subnet_ids) <= 50
    error_message = "EC2 Fleet takes at most 50 overrides per launch template config: instance types x subnets must be <= 50."
  }
}

variable "instance_requirements" {
  description = "Attribute-based instance type selection, used when instance_types is empty: GPU manufacturer, GPU count and total GPU memory, vCPU and memory ranges. EC2 then picks any current type that matches, in every subnet."
  type = object({
    accelerator_manufacturers  = optional(list(string), ["nvidia"])
    accelerator_count_min      = optional(number, 1)
    accelerator_count_max      = optional(number)
    accelerator_memory_mib_min = optional(number)
    accelerator_memory_mib_max = optional(number)
    vcpu_min                   = optional(number, 4)
    vcpu_max                   = optional(number)
    memory_mib_min             = optional(number, 16384)
    memory_mib_max             = optional(number)
  })
  default = null

  validation {
    condition = var.instance_requirements == null ? true : alltrue([
      for manufacturer in var.instance_requirements.accelerator_manufacturers :
      contains(["nvidia", "amd", "amazon-web-services", "xilinx", "habana"], manufacturer)
    ])
    error_message = "accelerator_manufacturers takes nvidia, amd, amazon-web-services, xilinx or habana."
  }

  validation {
    condition     = var.instance_requirements == null ? true : var.instance_requirements.accelerator_count_min >= 1
    error_message = "accelerator_count_min must be at least 1: a training fleet needs GPUs."
  }
}

variable "target_capacity" {
  description = "Number of instances the fleet keeps running. With type maintain, EC2 replaces every interrupted instance to get back to this number."
  type        = number
  default     = 1

  validation {
    condition     = var.target_capacity >= 1 && floor(var.target_capacity) == var.target_capacity
    error_message = "target_capacity must be a whole number of at least 1."
  }
}

variable "on_demand_base_capacity" {
  description = "How many of the target_capacity instances are on-demand (never interrupted); the rest are spot. An on-demand base keeps, for example, a rank-0 node alive."
  type        = number
  default     = 0

  validation {
    condition     = var.on_demand_base_capacity >= 0 && var.on_demand_base_capacity <= var.target_capacity
    error_message = "on_demand_base_capacity must be between 0 and target_capacity."
  }
}

variable "spot_max_price" {
  description = "Highest hourly price to pay for a spot instance, in USD, as a string (for example \"1.20\"). Null caps it at the on-demand price, which AWS recommends: a low cap only causes more interruptions."
  type        = string
  default     = null

  validation {
    condition     = var.spot_max_price == null ? true : can(tonumber(var.spot_max_price)) && try(tonumber(var.spot_max_price) > 0, false)
    error_message = "spot_max_price must be a positive number in a string, such as \"1.20\", or null."
  }
}

variable "capacity_rebalance_termination_delay" {
  description = "Seconds between a replacement instance launched on a rebalance recommendation and the termination of the old one (launch-before-terminate): time for the old node to checkpoint. EC2 accepts 120 to 7200."
  type        = number
  default     = 300

  validation {
    condition     = var.capacity_rebalance_termination_delay >= 120 && var.capacity_rebalance_termination_delay <= 7200
    error_message = "capacity_rebalance_termination_delay must be 120..7200 seconds (EC2 rejects anything else, and 0 is what a replacement_strategy of launch would send)."
  }
}

variable "terminate_instances_on_delete" {
  description = "Whether destroying the fleet also terminates its instances. Keep true in real use; the offline tests set false because the emulator never finishes terminating."
  type        = bool
  default     = true
}

variable "create_fleet_service_linked_role" {
  description = "Create the AWSServiceRoleForEC2Fleet service-linked role, which EC2 Fleet needs once per account. Set false when the account already has it (creating it twice fails)."
  type        = bool
  default     = false
}

# ---------------------------------------------------------------------------------------------
# Launch template
# ---------------------------------------------------------------------------------------------

variable "ami_id" {
  description = "AMI to launch. Null looks up the newest AMI matching ami_name_filter from ami_owners."
  type        = string
  default     = null
}

variable "ami_name_filter" {
  description = "Name pattern of the AMI to look up when ami_id is null. The default is AWS's Deep Learning AMI with the NVIDIA driver and PyTorch on Ubuntu 22.04."
  type        = string
  default     = "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu 22.04) *"
}

variable "ami_owners" {
  description = "Owners to accept in the AMI lookup (amazon for the Deep Learning AMIs)."
  type        = list(string)
  default     = ["amazon"]
}

variable "root_device_name" {
  description = "Device name of the AMI's root volume, which the encrypted gp3 settings apply to (/dev/sda1 on Ubuntu AMIs, /dev/xvda on Amazon Linux)."
  type        = string
  default     = "/dev/sda1"
}

variable "root_volume_size_gb" {
  description = "Size of the encrypted gp3 root volume in GiB. The Deep Learning AMIs need at least 75 GiB; add room for datasets cached on the node."
  type        = number
  default     = 200

  validation {
    condition     = var.root_volume_size_gb >= 8 && var.root_volume_size_gb <= 16384
    error_message = "root_volume_size_gb must be 8..16384."
  }
}

variable "kms_key_arn" {
  description = "KMS key for the root volumes, the checkpoint bucket (when the module creates it) and the event queue. Null uses AWS-managed encryption (EBS default key, SSE-S3, SQS-managed SSE)."
  type        = string
  default     = null
}

variable "metadata_hop_limit" {
  description = "IMDSv2 PUT response hop limit. 2 lets containers on a bridge network reach IMDS (the trainer hooks poll it from inside containers); 1 confines it to the host."
  type        = number
  default     = 2

  validation {
    condition     = var.metadata_hop_limit >= 1 && var.metadata_hop_limit <= 64
    error_message = "metadata_hop_limit must be 1..64."
  }
}

variable "key_name" {
  description = "EC2 key pair for SSH, or null for none (SSM Session Manager needs no key: see enable_ssm)."
  type        = string
  default     = null
}

# ---------------------------------------------------------------------------------------------
# What runs on the nodes
# ---------------------------------------------------------------------------------------------

variable "spotguard_version" {
  description = "spotguard version to install from the package index on each node. Pinned, so that every replacement runs the same code."
  type        = string
  default     = "0.1.0"

  validation {
    condition     = can(regex("^[0-9]+(\\.[0-9]+){1,2}([a-z0-9.+-]*)$", var.spotguard_version))
    error_message = "spotguard_version must be a version such as 0.1.0 (it is pinned with ==)."
  }
}

variable "spotguard_wheel_s3_uri" {
  description = "Install spotguard from this wheel in S3 (s3://bucket/key.whl) instead of the package index. The instance role may read exactly this object."
  type        = string
  default     = null

  validation {
    condition     = var.spotguard_wheel_s3_uri == null ? true : can(regex("^s3://[a-z0-9.-]{3,63}/.+\\.whl$", var.spotguard_wheel_s3_uri))
    error_message = "spotguard_wheel_s3_uri must look like s3://bucket/path/spotguard-0.1.0-py3-none-any.whl."
  }
}

variable "spotguard_extras" {
  description = "Extras to install with spotguard into the training environment: s3 for the checkpoint store, lightning (or torch) for the trainer hooks. The agent is installed on its own, without extras."
  type        = list(string)
  default     = ["s3", "lightning"]
}

variable "training_command" {
  description = "Command that starts training on each node, run by spotguard-training@<name>.service with SPOTGUARD_CHECKPOINT_URI set. It must resume by itself (SpotCheckpoint or SpotGuard do) and exit 75 when preempted."
  type        = string

  validation {
    condition     = length(trimspace(var.training_command)) > 0 && !can(regex("[\n\r]", var.training_command))
    error_message = "training_command must be one non-empty line."
  }
}

variable "training_python" {
  description = "Python interpreter the training command runs with (first on its PATH); the trainer hooks and their extras are installed into its environment. The default is the Deep Learning AMI's PyTorch environment. With another AMI, name a venv or conda interpreter that has torch, not the system Python (current Ubuntu refuses pip installs there)."
  type        = string
  default     = "/opt/pytorch/bin/python"

  validation {
    condition     = can(regex("^/[A-Za-z0-9._+/-]+$", var.training_python))
    error_message = "training_python must be an absolute path without spaces, such as /opt/pytorch/bin/python."
  }
}

variable "training_user" {
  description = "Local user the training service runs as (ubuntu on Ubuntu AMIs, ec2-user on Amazon Linux)."
  type        = string
  default     = "ubuntu"

  validation {
    condition     = can(regex("^[a-z_][a-z0-9_-]{0,31}$", var.training_user))
    error_message = "training_user must be a valid local user name."
  }
}

variable "agent_settings" {
  description = "Extra keys for /etc/spotguard/agent.toml as TOML values already quoted (for example { log_format = \"\\\"json\\\"\" }). The defaults suit a training node: poll every second, signal with SIGUSR1."
  type        = map(string)
  default     = {}
}

variable "enable_ssm" {
  description = "Attach AmazonSSMManagedInstanceCore to the instance role, for Session Manager access without SSH keys or inbound ports."
  type        = bool
  default     = true
}

# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

variable "create_bucket" {
  description = "Create the checkpoint bucket. False uses the existing bucket named by bucket_name (its policy and encryption are then yours to manage)."
  type        = bool
  default     = true
}

variable "bucket_name" {
  description = "Name of the checkpoint bucket. Null with create_bucket derives one from the name, account and Region."
  type        = string
  default     = null

  validation {
    condition     = var.bucket_name == null ? true : can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be a valid S3 bucket name (3-63 lower-case letters, digits, dots and hyphens)."
  }
}

variable "checkpoint_prefix" {
  description = "Key prefix for this fleet's checkpoints inside the bucket; the instance role can touch nothing outside it. SPOTGUARD_CHECKPOINT_URI is s3://<bucket>/<prefix>."
  type        = string
  default     = "checkpoints"

  validation {
    condition     = can(regex("^[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*$", var.checkpoint_prefix))
    error_message = "checkpoint_prefix must be a relative key prefix without leading or trailing slashes, such as checkpoints or runs/llm-7b."
  }
}

variable "checkpoint_expiration_days" {
  description = "Delete checkpoint objects this many days after they were written (the trainer hooks prune old ones themselves; this catches abandoned runs). Null keeps them."
  type        = number
  default     = 30

  validation {
    condition     = var.checkpoint_expiration_days == null ? true : var.checkpoint_expiration_days >= 1
    error_message = "checkpoint_expiration_days must be at least 1, or null."
  }
}

variable "abort_incomplete_multipart_days" {
  description = "Abort multipart uploads left unfinished this many days (a node killed mid-upload leaves one; unfinished parts are billed but invisible)."
  type        = number
  default     = 1

  validation {
    condition     = var.abort_incomplete_multipart_days >= 1
    error_message = "abort_incomplete_multipart_days must be at least 1."
  }
}

variable "bucket_versioning" {
  description = "Turn on versioning for the checkpoint bucket (protects against deletes, at the cost of storing every overwritten object)."
  type        = bool
  default     = false
}

variable "bucket_force_destroy" {
  description = "Let terraform destroy delete a bucket that still holds checkpoints. Off by default: checkpoints are the point."
  type        = bool
  default     = false
}

# ---------------------------------------------------------------------------------------------
# Events and drills
# ---------------------------------------------------------------------------------------------

variable "event_retention_seconds" {
  description = "How long interruption, rebalance and state-change events wait in the SQS queue for a consumer."
  type        = number
  default     = 345600

  validation {
    condition     = var.event_retention_seconds >= 60 && var.event_retention_seconds <= 1209600
    error_message = "event_retention_seconds must be 60..1209600 (SQS limits)."
  }
}

variable "create_fis_experiment" {
  description = "Create an AWS FIS experiment template that sends real spot interruption notices to this fleet's instances (selected by the spotguard:fleet tag): the real-world drill."
  type        = bool
  default     = false
}

variable "fis_interruption_target" {
  description = "Which of the fleet's spot instances the FIS experiment interrupts, in FIS selection mode syntax: ALL, COUNT(n) or PERCENT(n)."
  type        = string
  default     = "COUNT(1)"

  validation {
    condition     = can(regex("^(ALL|COUNT\\([1-9][0-9]*\\)|PERCENT\\(([1-9][0-9]?|100)\\))$", var.fis_interruption_target))
    error_message = "fis_interruption_target must be ALL, COUNT(n) or PERCENT(n)."
  }
}
