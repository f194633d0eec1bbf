{{/*
Names, labels, worker sizing and the Serve config. Every cross-field check the schema cannot
express (values.schema.json only sees one field at a time) fails here, with the numbers.
*/}}

{{- define "ernie-cluster.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name; KubeRay derives pod and service names from it, so keep it short. */}}
{{- define "ernie-cluster.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "ernie-cluster.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ernie-cluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Pod selector labels. NOTE: not app.kubernetes.io/name: KubeRay sets that label to "kuberay" on
the pods it creates and selects its own services by it.
*/}}
{{- define "ernie-cluster.podSelectorLabels" -}}
app.kubernetes.io/part-of: {{ include "ernie-cluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ernie-cluster.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "ernie-cluster.tensorParallelSize" -}}
{{- int .Values.serve.tensorParallelSize }}
{{- end }}

{{- define "ernie-cluster.gpusPerPod" -}}
{{- $tp := int .Values.serve.tensorParallelSize }}
{{- $gpus := int (.Values.worker.gpusPerPod | default $tp) }}
{{- if ne (mod $gpus $tp) 0 }}
{{- fail (printf "worker.gpusPerPod (%d) must be a multiple of serve.tensorParallelSize (%d): a replica's shard workers share one pod" $gpus $tp) }}
{{- end }}
{{- $gpus }}
{{- end }}

{{/* Worker pods: min and max from the Serve autoscaling bounds (see values.yaml). */}}
{{- define "ernie-cluster.workerPods" -}}
{{- $a := .Values.serve.autoscaling }}
{{- $minReplicas := int $a.minReplicas }}
{{- $maxReplicas := int $a.maxReplicas }}
{{- if gt $minReplicas $maxReplicas }}
{{- fail (printf "serve.autoscaling.minReplicas (%d) must be <= maxReplicas (%d)" $minReplicas $maxReplicas) }}
{{- end }}
{{- $tp := int .Values.serve.tensorParallelSize }}
{{- $perPod := div (int (include "ernie-cluster.gpusPerPod" .)) $tp }}
{{- $cpus := int .Values.worker.cpus }}
{{- $needCpus := mul $perPod (add $tp 1) }}
{{- if lt $cpus $needCpus }}
{{- fail (printf "worker.cpus (%d) is too small: %d replica(s) per pod x (tensorParallelSize %d + 1) needs %d" $cpus $perPod $tp $needCpus) }}
{{- end }}
{{- $minPods := div (add $minReplicas (sub $perPod 1)) $perPod }}
{{- $maxPods := div (add $maxReplicas (sub $perPod 1)) $perPod }}
{{- dict "min" $minPods "max" $maxPods "replicasPerPod" $perPod | toJson }}
{{- end }}

{{/* The Serve application's args: ServeAppConfig fields (snake_case). */}}
{{- define "ernie-cluster.serveArgs" -}}
{{- $s := .Values.serve }}
{{- $tp := int $s.tensorParallelSize }}
{{- $ep := int ($s.expertParallelSize | default $tp) }}
{{- if ne $ep $tp }}
{{- fail (printf "serve.expertParallelSize (%d) must equal serve.tensorParallelSize (%d) for now" $ep $tp) }}
{{- end }}
{{- $args := dict "model" .Values.model.name "dtype" .Values.model.dtype "device" "cuda" }}
{{- if .Values.model.revision }}
{{- $_ := set $args "revision" .Values.model.revision }}
{{- end }}
{{- $_ := set $args "served_model_name" (.Values.model.servedModelNames | default (list .Values.model.name)) }}
{{- $_ := set $args "tensor_parallel_size" $tp }}
{{- $_ := set $args "expert_parallel_size" $ep }}
{{- if $s.maxModelLen }}
{{- $_ := set $args "max_model_len" (int $s.maxModelLen) }}
{{- end }}
{{- $_ := set $args "max_num_seqs" (int $s.maxNumSeqs) }}
{{- $_ := set $args "max_num_batched_tokens" (int $s.maxNumBatchedTokens) }}
{{- $_ := set $args "gpu_memory_utilization" (float64 $s.gpuMemoryUtilization) }}
{{- $_ := set $args "enable_prefix_caching" $s.enablePrefixCaching }}
{{- $_ := set $args "kv_offload_gb" (float64 $s.kvOffloadGb) }}
{{- if $s.maxWaitingRequests }}
{{- $_ := set $args "max_waiting_requests" (int $s.maxWaitingRequests) }}
{{- end }}
{{- if $s.reasoningParser }}
{{- $_ := set $args "reasoning_parser" $s.reasoningParser }}
{{- end }}
{{- if $s.toolCallParser }}
{{- $_ := set $args "tool_call_parser" $s.toolCallParser }}
{{- end }}
{{- $a := $s.autoscaling }}
{{- $autoscaling := dict "min_replicas" (int $a.minReplicas) "max_replicas" (int $a.maxReplicas) "target_ongoing_requests" $a.targetOngoingRequests }}
{{- /* NOTE: null or absent leaves the key out (Ray's default); 0 is a real value, so no `if`. */}}
{{- if not (kindIs "invalid" $a.upscaleDelayS) }}
{{- $_ := set $autoscaling "upscale_delay_s" $a.upscaleDelayS }}
{{- end }}
{{- if not (kindIs "invalid" $a.downscaleDelayS) }}
{{- $_ := set $autoscaling "downscale_delay_s" $a.downscaleDelayS }}
{{- end }}
{{- $_ := set $args "autoscaling" $autoscaling }}
{{- $_ := set $args "ingress_replicas" (int $s.ingressReplicas) }}
{{- $_ := set $args "placement_strategy" $s.placementStrategy }}
{{- if hasKey ($s.extraArgs | default dict) "api_key" }}
{{- fail "serve.extraArgs.api_key would be readable by anyone who can read the RayService: put the key in a Secret and set auth.existingSecret" }}
{{- end }}
{{- toYaml (mergeOverwrite $args (deepCopy ($s.extraArgs | default dict))) }}
{{- end }}

{{/* serveConfigV2: the structure of deploy/serve_config.yaml. */}}
{{- define "ernie-cluster.serveConfig" -}}
{{- $app := dict "name" "ernie" "route_prefix" "/" "import_path" "ernie_cluster.serving.ray_serve.builder:build_app" "args" (include "ernie-cluster.serveArgs" . | fromYaml) }}
{{- $http := dict "host" "0.0.0.0" "port" (int .Values.serve.httpPort) }}
{{- toYaml (dict "proxy_location" "EveryNode" "http_options" $http "applications" (list $app)) }}
{{- end }}

{{- define "ernie-cluster.hfSecretName" -}}
{{- .Values.huggingface.existingSecret | default (printf "%s-hf" (include "ernie-cluster.fullname" .)) }}
{{- end }}

{{- define "ernie-cluster.modelCacheClaim" -}}
{{- .Values.modelCache.pvc.existingClaim | default (printf "%s-model-cache" (include "ernie-cluster.fullname" .)) }}
{{- end }}

{{/* Environment shared by head and workers: model cache, HF token, API key, user extras. */}}
{{- define "ernie-cluster.env" -}}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.modelCache.mountPath | quote }}
{{- if .Values.auth.existingSecret }}
{{- /* NOTE: read by build_app (Serve controller) wherever Ray runs it: head or worker. */}}
- name: ERNIE_CLUSTER_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.auth.existingSecret }}
      key: {{ .Values.auth.secretKey }}
{{- end }}
{{- if or .Values.huggingface.existingSecret .Values.huggingface.token }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "ernie-cluster.hfSecretName" . }}
      key: {{ .Values.huggingface.secretKey }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "ernie-cluster.volumeMounts" -}}
- name: model-cache
  mountPath: {{ .Values.modelCache.mountPath }}
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{/* Pod volumes; the argument is (list $ shmSize). */}}
{{- define "ernie-cluster.volumes" -}}
{{- $root := index . 0 }}
{{- $shm := index . 1 }}
{{- $cache := $root.Values.modelCache -}}
- name: model-cache
{{- if eq $cache.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "ernie-cluster.modelCacheClaim" $root }}
{{- else if eq $cache.type "hostPath" }}
  hostPath:
    path: {{ $cache.hostPath.path }}
    type: DirectoryOrCreate
{{- else if $cache.emptyDir.sizeLimit }}
  emptyDir:
    sizeLimit: {{ $cache.emptyDir.sizeLimit }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $shm }}
{{- end }}
