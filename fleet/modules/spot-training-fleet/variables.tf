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
  description = "Tags for every resource the module creates, including the instances and volumes the fleet launches. Keys follow EC2's rules: 1-128 letters, digits, spaces and _ . : / = + - @, not starting with aws:; values at most 256 characters."
  type        = map(string)
  default     = {}

  validation {
    condition = alltrue([
      for key, value in var.tags :
      can(regex("^[\\p{L}\\p{Z}\\p{N}_.:/=+@-]{1,128}$", key)) && !startswith(lower(key), "aws:") && length(value) <= 256 && can(regex("^[\\p{L}\\p{Z}\\p{N}_.:/=+@-]*$", value))
    ])
    error_message = "Tag keys must be 1-128 letters, digits, spaces and _ . : / = + - @ and must not start with aws:; values at most 256 of the same characters. EC2 rejects every launch otherwise."
  }
}

# ---------------------------------------------------------------------------------------------
# Capacity
# ---------------------------------------------------------------------------------------------

variable "instance_types" {
  description = "GPU instance types the fleet may use, each matching allowed_instance_types. Every type is paired with every subnet as an override, so more types and zones mean more spot pools to draw from. Give types with the same number of GPUs: a replacement node of another type changes the job's world size. Leave empty to select by attributes (instance_requirements) instead."
  type        = list(string)
  default     = ["g5.xlarge", "g5.2xlarge", "g6.xlarge", "g6.2xlarge"]

  validation {
    condition     = length(var.instance_types) * length(var.subnet_ids) <= 50
    error_message = "EC2 Fleet takes at most 50 overrides per launch template config: instance types x subnets must be <= 50."
  }

  validation {
    condition = alltrue([
      for type in var.instance_types : anytrue([
        for pattern in var.allowed_instance_types :
        can(regex("^${replace(replace(pattern, ".", "\\."), "*", ".*")}$", type))
      ])
    ])
    error_message = "Every instance type must match allowed_instance_types (GPU types the Deep Learning AMI supports); widen allowed_instance_types when your AMI supports more."
  }
}

variable "allowed_instance_types" {
  description = "Instance types the fleet may ever launch, with * as a wildcard: instance_types must match them, and attribute-based selection is restricted to them. The default is the x86_64 GPU families the Deep Learning AMI (OSS NVIDIA driver, PyTorch) supports: G4dn, G5, G6, Gr6, G6e, P4d, P4de, P5, P5e, P5en, P6-B200."
  type        = list(string)
  default     = ["g4dn.*", "g5.*", "g6.*", "gr6.*", "g6e.*", "p4d.*", "p4de.*", "p5.*", "p5e.*", "p5en.*", "p6-b200.*"]
  # A caller passing null (examples/basic when not set) gets this default.
  nullable = false

  validation {
    condition     = length(var.allowed_instance_types) >= 1 && length(var.allowed_instance_types) <= 400 && alltrue([for pattern in var.allowed_instance_types : can(regex("^[a-z0-9*][a-z0-9.*-]*$", pattern))])
    error_message = "allowed_instance_types takes 1-400 instance types or patterns such as g5.* (lower-case letters, digits, ., - and *)."
  }
}

variable "allow_gpu_count_change" {
  description = "Let the fleet launch instances with different numbers of GPUs: attribute-based selection then picks from accelerator_count_min up to accelerator_count_max, and instance_types may mix GPU counts. Off by default: a replacement with another GPU count changes the job's world size; turn it on only when the training command resumes at any world size."
  type        = bool
  default     = false
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

  validation {
    condition     = try(var.instance_requirements.accelerator_count_max, null) == null ? true : var.allow_gpu_count_change ? var.instance_requirements.accelerator_count_max >= var.instance_requirements.accelerator_count_min : var.instance_requirements.accelerator_count_max == var.instance_requirements.accelerator_count_min
    error_message = "accelerator_count_max must equal accelerator_count_min (or be left out): a replacement node with another GPU count would change the job's world size. Set allow_gpu_count_change = true if the job resumes at any world size (then max >= min)."
  }
}

variable "target_capacity" {
  description = "Number of instances the fleet keeps running; EC2 replaces every interrupted one. One fleet runs one job, on `nodes` nodes: null or `nodes` runs it, 0 pauses it (the checkpoints stay; `nodes` again resumes it). A job that ended (finished, or failed max_consecutive_failures times) set its fleet to 0 itself: set 0 here too, or the next plan shows the drift 0 -> nodes and an apply starts the job again."
  type        = number
  default     = null

  validation {
    condition     = var.target_capacity == null ? true : var.target_capacity == 0 || var.target_capacity == var.nodes
    error_message = "target_capacity must be nodes (the job runs on that many nodes) or 0 (paused); null means nodes. N copies of a single-node job would share one checkpoint prefix: a job across N nodes is nodes = N."
  }
}

variable "nodes" {
  description = "How many nodes the job runs on. 1: a single-node job, as the training command starts it. More: one torchrun elastic job across that many nodes in one Availability Zone (the multi-node mode: the training command runs once per GPU under torchrun, which meets at a rendezvous store on a small on-demand host the module adds; see fleet/README.md)."
  type        = number
  default     = 1

  validation {
    condition     = var.nodes >= 1 && var.nodes <= 64 && floor(var.nodes) == var.nodes
    error_message = "nodes must be a whole number from 1 to 64."
  }

  validation {
    condition     = var.nodes == 1 || length(var.subnet_ids) == 1
    error_message = "nodes > 1 runs one job across the nodes: give exactly one subnet (one Availability Zone). Across zones, the traffic between nodes is slow and billed, and the rendezvous host's address lives in one subnet."
  }
}

variable "min_nodes" {
  description = "With nodes > 1: the fewest nodes the job runs on (torchrun --nnodes min_nodes:nodes). When a node is lost, the others go on at the smaller size if at least min_nodes remain, and wait for its replacement otherwise. Null means nodes: the world size never changes (and the job need not resume at another world size)."
  type        = number
  default     = null

  validation {
    condition     = var.min_nodes == null ? true : var.min_nodes >= 1 && var.min_nodes <= var.nodes && floor(var.min_nodes) == var.min_nodes
    error_message = "min_nodes must be a whole number from 1 to nodes (null: nodes)."
  }
}

variable "processes_per_node" {
  description = "With nodes > 1: torchrun's --nproc-per-node, the training processes per node: gpu (one per GPU, the default) or a number."
  type        = string
  default     = "gpu"

  validation {
    condition     = can(regex("^(gpu|[1-9][0-9]{0,2})$", var.processes_per_node))
    error_message = "processes_per_node must be gpu or a whole number from 1 to 999."
  }
}

variable "max_restarts" {
  description = "With nodes > 1: torchrun's --max-restarts. Every interruption of another node costs each surviving node one restart (its workers exit 75 after the emergency save, which torchrun counts as a failure), and the count never resets; a node out of restarts ends the job for all nodes. So it is large; a training command that crashes at once also runs this many times before the node counts a failure."
  type        = number
  default     = 100

  validation {
    condition     = var.max_restarts >= 1 && var.max_restarts <= 10000 && floor(var.max_restarts) == var.max_restarts
    error_message = "max_restarts must be a whole number from 1 to 10000."
  }
}

variable "rendezvous_join_timeout" {
  description = "With nodes > 1: how long, in seconds, the nodes wait at the rendezvous for min_nodes of them (torchrun's join_timeout): after a node is lost, the survivors wait this long for its replacement (launch, set-up and pip install take minutes; spot capacity may take longer). Past it torchrun gives up and the job fails on every node."
  type        = number
  default     = 3600

  validation {
    condition     = var.rendezvous_join_timeout >= 600 && var.rendezvous_join_timeout <= 86400
    error_message = "rendezvous_join_timeout must be 600..86400 seconds: a replacement spot node needs minutes to launch and set itself up."
  }
}

variable "rendezvous_port" {
  description = "With nodes > 1: the TCP port of the rendezvous store (torchrun's --rdzv-endpoint HOST:PORT)."
  type        = number
  default     = 29400

  validation {
    condition     = var.rendezvous_port >= 1024 && var.rendezvous_port <= 65535
    error_message = "rendezvous_port must be 1024..65535 (the store runs without privileges)."
  }
}

variable "rendezvous_instance_type" {
  description = "With nodes > 1: the instance type of the on-demand rendezvous host, which runs only torch's TCP store (spotguard rendezvous-store): a small general-purpose type."
  type        = string
  default     = "t3.medium"
}

variable "rendezvous_ami_id" {
  description = "With nodes > 1: the AMI of the rendezvous host, or null for the nodes' AMI. The store is torch's: the AMI needs training_python with torch (the Deep Learning AMIs have it)."
  type        = string
  default     = null
}

variable "rendezvous_public_ip" {
  description = "With nodes > 1: give the rendezvous host a public IP (an Elastic IP on its interface), which it needs to reach S3 and the package index at set-up when the subnet has no NAT gateway. Null follows the subnet: a public IP where the subnet gives its instances one (the default VPC). Set it when the subnet is created in the same configuration (its setting is then unknown at plan)."
  type        = bool
  default     = null
}

variable "cluster_placement_group" {
  description = "With nodes > 1: launch the nodes into a cluster placement group (low latency, high bandwidth between them). Replacements must then fit the same group, so spot capacity for them can be scarcer."
  type        = bool
  default     = false
}

variable "on_demand_base_capacity" {
  description = "How many of the target_capacity instances are on-demand (never interrupted); the rest are spot. Fixed when the fleet is created: EC2 Fleet cannot change the split in place, so a change is refused at plan."
  type        = number
  default     = 0

  validation {
    condition     = var.on_demand_base_capacity >= 0 && var.on_demand_base_capacity <= coalesce(var.target_capacity, var.nodes)
    error_message = "on_demand_base_capacity must be between 0 and target_capacity (nodes unless paused)."
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
  description = "Seconds between a replacement instance launched on a rebalance recommendation and the termination of the old one (launch-before-terminate): time for the old node to checkpoint. EC2 accepts 120 to 7200. Fixed when the fleet is created: ModifyFleet cannot change it, so a change is refused at plan."
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
  description = "AMI to launch. Null looks up the newest AMI matching ami_name_filter from ami_owners, once: the AMI found stays in use (plans stay clean when AWS publishes a newer one) until ami_id, ami_name_filter or ami_owners changes, or terraform apply -replace='<address of terraform_data.ami[0]>' moves it to the newest."
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
  description = "ARN of a customer KMS key for the root volumes, the checkpoint bucket (when the module creates it) and the event queue. Its key policy needs the statements in the kms_key_policy_statements output (the module README says why). Null uses AWS-managed encryption (EBS default key, SSE-S3, SQS-managed SSE)."
  type        = string
  default     = null

  validation {
    condition     = var.kms_key_arn == null ? true : can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$", var.kms_key_arn))
    error_message = "kms_key_arn must be a key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID): IAM policies and grants do not resolve aliases."
  }
}

variable "grant_kms_key_to_fleet_service_role" {
  description = "With kms_key_arn, create a KMS grant that lets EC2 Fleet's service-linked role (AWSServiceRoleForEC2Fleet) use the key for the encrypted root volumes; without it no instance launches. Whoever applies needs kms:CreateGrant on the key. Set false when the key policy already allows that role."
  type        = bool
  default     = true
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
  description = "The spotguard version the wheel must be (checked against its file name), or null to take whichever wheel is given. spotguard is never installed from a package index."
  type        = string
  default     = null

  validation {
    condition     = var.spotguard_version == null ? true : can(regex("^[0-9]+(\\.[0-9]+){1,2}([a-z0-9.+-]*)$", var.spotguard_version))
    error_message = "spotguard_version must be a version such as 0.1.0, or null."
  }
}

variable "spotguard_wheel_s3_uri" {
  description = "A spotguard wheel already in S3 (s3://bucket/key.whl) to install instead of uploading spotguard_wheel_path, with its SHA-256 in spotguard_wheel_sha256. The instance role may read exactly this object. Give this or spotguard_wheel_path."
  type        = string
  default     = null

  validation {
    condition     = var.spotguard_wheel_s3_uri == null ? true : can(regex("^s3://[a-z0-9.-]{3,63}/([^/]+/)*spotguard-[0-9][^-/]*-py3-none-any\\.whl$", var.spotguard_wheel_s3_uri))
    error_message = "spotguard_wheel_s3_uri must look like s3://bucket/path/spotguard-0.1.0-py3-none-any.whl (pip installs a wheel only under its own file name, as `spotguard fleet package` writes it)."
  }
}

variable "spotguard_wheel_sha256" {
  description = "SHA-256 of the wheel at spotguard_wheel_s3_uri (64 hex digits, as `spotguard fleet package` prints it). The nodes install that object only if its bytes have this hash, so whoever can overwrite the object cannot make the nodes run other code. Required with spotguard_wheel_s3_uri; not with spotguard_wheel_path, whose file Terraform hashes itself."
  type        = string
  default     = null

  validation {
    condition     = var.spotguard_wheel_sha256 == null ? var.spotguard_wheel_s3_uri == null : can(regex("^[0-9a-f]{64}$", var.spotguard_wheel_sha256)) && var.spotguard_wheel_s3_uri != null
    error_message = "spotguard_wheel_sha256 goes with spotguard_wheel_s3_uri, and only with it: 64 lower-case hex digits, the wheel's SHA-256 (sha256sum, or what `spotguard fleet package` prints)."
  }
}

variable "spotguard_extras" {
  description = "Extras to install with spotguard into the training environment: s3 for the checkpoint store, lightning (or torch) for the trainer hooks. The agent is installed on its own, without extras."
  type        = list(string)
  default     = ["s3", "lightning"]
}

variable "training_command" {
  description = "Command that starts training on each node, run by spotguard-training@<name>.service with SPOTGUARD_CHECKPOINT_URI set; with nodes > 1, the command each process runs, which the module starts under torchrun. It must resume by itself (SpotCheckpoint or SpotGuard do) and exit 75 when preempted."
  type        = string

  validation {
    condition     = length(trimspace(var.training_command)) > 0 && !can(regex("[\n\r]", var.training_command))
    error_message = "training_command must be one non-empty line."
  }

  validation {
    condition     = var.nodes == 1 || !can(regex("(^|[/\\s])torchrun\\s|torch\\.distributed\\.(run|launch)", var.training_command))
    error_message = "With nodes > 1 the module starts the training command under torchrun itself: give the command each process runs (python train.py ...), not a torchrun command."
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
  description = "Create the checkpoint bucket. False uses the existing bucket named by bucket_name, which must exist (its policy, encryption and lifecycle are then yours to manage)."
  type        = bool
  default     = true

  validation {
    condition     = var.create_bucket || var.bucket_name != null
    error_message = "create_bucket = false uses an existing bucket: name it in bucket_name."
  }
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

variable "noncurrent_version_expiration_days" {
  description = "Delete checkpoint object versions this many days after they stopped being current (overwritten or deleted; only with bucket_versioning). Current objects never expire: the trainer hooks prune old checkpoints themselves, and the newest checkpoint of a paused run must survive the pause."
  type        = number
  default     = 7

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1
    error_message = "noncurrent_version_expiration_days must be at least 1."
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

# ---------------------------------------------------------------------------------------------
# spotguard on the nodes, and the end of the job (wheel.tf, job_end.tf)
# ---------------------------------------------------------------------------------------------

variable "spotguard_wheel_path" {
  description = "Local path of the spotguard wheel the nodes install, as `spotguard fleet package` builds it. Terraform uploads it into the bucket under spotguard/wheels/<sha256>/ and the nodes install that file after checking its SHA-256. Give this or spotguard_wheel_s3_uri: spotguard is never installed by name from a package index."
  type        = string
  default     = null

  validation {
    condition     = (var.spotguard_wheel_path == null) != (var.spotguard_wheel_s3_uri == null)
    error_message = "Give exactly one of spotguard_wheel_path (build it with `spotguard fleet package`) and spotguard_wheel_s3_uri: the nodes install spotguard only from your own wheel."
  }

  validation {
    condition     = var.spotguard_wheel_path == null ? true : can(regex("^spotguard-[0-9][^-]*-py3-none-any\\.whl$", basename(var.spotguard_wheel_path)))
    error_message = "spotguard_wheel_path must name a wheel file such as dist/spotguard-0.1.0-py3-none-any.whl, as `spotguard fleet package` writes it."
  }

  validation {
    condition     = var.spotguard_wheel_path == null ? true : fileexists(var.spotguard_wheel_path)
    error_message = "spotguard_wheel_path does not exist: build the wheel with `spotguard fleet package` (it prints the path)."
  }

  validation {
    condition = var.spotguard_version == null ? true : !can(regex("^[0-9]", var.spotguard_version)) ? true : startswith(
      basename(coalesce(var.spotguard_wheel_path, var.spotguard_wheel_s3_uri, "-")), "spotguard-${var.spotguard_version}-"
    )
    error_message = "The wheel is not spotguard_version: its file name must start with spotguard-<spotguard_version>-."
  }
}

variable "max_consecutive_failures" {
  description = "How many times in a row the training command may fail (any exit but 0 and 75) before the node ends the job: the fleet's target capacity goes to 0, the node powers off and the status object holds the last error. Until then systemd restarts the command."
  type        = number
  default     = 3

  validation {
    condition     = var.max_consecutive_failures >= 1 && var.max_consecutive_failures <= 100 && floor(var.max_consecutive_failures) == var.max_consecutive_failures
    error_message = "max_consecutive_failures must be a whole number from 1 to 100."
  }
}
