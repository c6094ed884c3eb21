//! The rules, with buf's IDs and categories (`buf config ls-breaking-rules`),
//! so that a `buf.yaml` and `protomesh check --breaking` speak of the same
//! things. buf's `CSR` category is left out.

use std::fmt;

/// A set of rules that describe one kind of compatibility, from strictest to loosest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Category {
    /// Generated code keeps compiling, file by file: nothing moves between files.
    #[value(name = "FILE")]
    File,
    /// Generated code keeps compiling, package by package: elements may move between files.
    #[value(name = "PACKAGE")]
    Package,
    /// The binary and the JSON encodings both stay readable by either side.
    #[value(name = "WIRE_JSON")]
    WireJson,
    /// The binary encoding stays readable by either side.
    #[value(name = "WIRE")]
    Wire,
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Category::File => "FILE",
            Category::Package => "PACKAGE",
            Category::WireJson => "WIRE_JSON",
            Category::Wire => "WIRE",
        })
    }
}

macro_rules! rules {
    ($($variant:ident = $id:literal [$($category:ident),+];)*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Rule { $($variant),* }

        impl Rule {
            pub const ALL: &[Rule] = &[$(Rule::$variant),*];

            /// buf's ID of the rule, e.g. `FIELD_SAME_TYPE`.
            pub fn id(self) -> &'static str {
                match self { $(Rule::$variant => $id),* }
            }

            pub fn categories(self) -> &'static [Category] {
                match self { $(Rule::$variant => &[$(Category::$category),+]),* }
            }
        }
    };
}

rules! {
    ExtensionNoDelete = "EXTENSION_NO_DELETE" [File];
    ServiceNoDelete = "SERVICE_NO_DELETE" [File];
    EnumNoDelete = "ENUM_NO_DELETE" [File];
    FileNoDelete = "FILE_NO_DELETE" [File];
    MessageNoDelete = "MESSAGE_NO_DELETE" [File];
    EnumSameType = "ENUM_SAME_TYPE" [File, Package];
    FieldSameCardinality = "FIELD_SAME_CARDINALITY" [File, Package];
    FieldSameCppStringType = "FIELD_SAME_CPP_STRING_TYPE" [File, Package];
    FieldSameJavaUtf8Validation = "FIELD_SAME_JAVA_UTF8_VALIDATION" [File, Package];
    FieldSameJstype = "FIELD_SAME_JSTYPE" [File, Package];
    FieldSameUtf8Validation = "FIELD_SAME_UTF8_VALIDATION" [File, Package];
    FileSameCcEnableArenas = "FILE_SAME_CC_ENABLE_ARENAS" [File, Package];
    FileSameCcGenericServices = "FILE_SAME_CC_GENERIC_SERVICES" [File, Package];
    FileSameCsharpNamespace = "FILE_SAME_CSHARP_NAMESPACE" [File, Package];
    FileSameGoPackage = "FILE_SAME_GO_PACKAGE" [File, Package];
    FileSameJavaGenericServices = "FILE_SAME_JAVA_GENERIC_SERVICES" [File, Package];
    FileSameJavaMultipleFiles = "FILE_SAME_JAVA_MULTIPLE_FILES" [File, Package];
    FileSameJavaOuterClassname = "FILE_SAME_JAVA_OUTER_CLASSNAME" [File, Package];
    FileSameJavaPackage = "FILE_SAME_JAVA_PACKAGE" [File, Package];
    FileSameObjcClassPrefix = "FILE_SAME_OBJC_CLASS_PREFIX" [File, Package];
    FileSameOptimizeFor = "FILE_SAME_OPTIMIZE_FOR" [File, Package];
    FileSamePhpClassPrefix = "FILE_SAME_PHP_CLASS_PREFIX" [File, Package];
    FileSamePhpMetadataNamespace = "FILE_SAME_PHP_METADATA_NAMESPACE" [File, Package];
    FileSamePhpNamespace = "FILE_SAME_PHP_NAMESPACE" [File, Package];
    FileSamePyGenericServices = "FILE_SAME_PY_GENERIC_SERVICES" [File, Package];
    FileSameRubyPackage = "FILE_SAME_RUBY_PACKAGE" [File, Package];
    FileSameSwiftPrefix = "FILE_SAME_SWIFT_PREFIX" [File, Package];
    RpcNoDelete = "RPC_NO_DELETE" [File, Package];
    EnumValueNoDelete = "ENUM_VALUE_NO_DELETE" [File, Package];
    ExtensionMessageNoDelete = "EXTENSION_MESSAGE_NO_DELETE" [File, Package];
    FieldNoDelete = "FIELD_NO_DELETE" [File, Package];
    FieldSameType = "FIELD_SAME_TYPE" [File, Package];
    FileSameSyntax = "FILE_SAME_SYNTAX" [File, Package];
    MessageNoRemoveStandardDescriptorAccessor = "MESSAGE_NO_REMOVE_STANDARD_DESCRIPTOR_ACCESSOR" [File, Package];
    OneofNoDelete = "ONEOF_NO_DELETE" [File, Package];
    EnumSameJsonFormat = "ENUM_SAME_JSON_FORMAT" [File, Package, WireJson];
    EnumValueSameName = "ENUM_VALUE_SAME_NAME" [File, Package, WireJson];
    FieldSameJsonName = "FIELD_SAME_JSON_NAME" [File, Package, WireJson];
    FieldSameName = "FIELD_SAME_NAME" [File, Package, WireJson];
    MessageSameJsonFormat = "MESSAGE_SAME_JSON_FORMAT" [File, Package, WireJson];
    FieldSameDefault = "FIELD_SAME_DEFAULT" [File, Package, WireJson, Wire];
    FieldSameOneof = "FIELD_SAME_ONEOF" [File, Package, WireJson, Wire];
    FileSamePackage = "FILE_SAME_PACKAGE" [File, Package, WireJson, Wire];
    MessageSameRequiredFields = "MESSAGE_SAME_REQUIRED_FIELDS" [File, Package, WireJson, Wire];
    ReservedEnumNoDelete = "RESERVED_ENUM_NO_DELETE" [File, Package, WireJson, Wire];
    ReservedMessageNoDelete = "RESERVED_MESSAGE_NO_DELETE" [File, Package, WireJson, Wire];
    RpcSameClientStreaming = "RPC_SAME_CLIENT_STREAMING" [File, Package, WireJson, Wire];
    RpcSameIdempotencyLevel = "RPC_SAME_IDEMPOTENCY_LEVEL" [File, Package, WireJson, Wire];
    RpcSameRequestType = "RPC_SAME_REQUEST_TYPE" [File, Package, WireJson, Wire];
    RpcSameResponseType = "RPC_SAME_RESPONSE_TYPE" [File, Package, WireJson, Wire];
    RpcSameServerStreaming = "RPC_SAME_SERVER_STREAMING" [File, Package, WireJson, Wire];
    PackageEnumNoDelete = "PACKAGE_ENUM_NO_DELETE" [Package];
    PackageExtensionNoDelete = "PACKAGE_EXTENSION_NO_DELETE" [Package];
    PackageMessageNoDelete = "PACKAGE_MESSAGE_NO_DELETE" [Package];
    PackageNoDelete = "PACKAGE_NO_DELETE" [Package];
    PackageServiceNoDelete = "PACKAGE_SERVICE_NO_DELETE" [Package];
    EnumValueNoDeleteUnlessNameReserved = "ENUM_VALUE_NO_DELETE_UNLESS_NAME_RESERVED" [WireJson];
    FieldNoDeleteUnlessNameReserved = "FIELD_NO_DELETE_UNLESS_NAME_RESERVED" [WireJson];
    FieldWireJsonCompatibleCardinality = "FIELD_WIRE_JSON_COMPATIBLE_CARDINALITY" [WireJson];
    FieldWireJsonCompatibleType = "FIELD_WIRE_JSON_COMPATIBLE_TYPE" [WireJson];
    EnumValueNoDeleteUnlessNumberReserved = "ENUM_VALUE_NO_DELETE_UNLESS_NUMBER_RESERVED" [WireJson, Wire];
    FieldNoDeleteUnlessNumberReserved = "FIELD_NO_DELETE_UNLESS_NUMBER_RESERVED" [WireJson, Wire];
    FieldWireCompatibleCardinality = "FIELD_WIRE_COMPATIBLE_CARDINALITY" [Wire];
    FieldWireCompatibleType = "FIELD_WIRE_COMPATIBLE_TYPE" [Wire];
}

impl Rule {
    /// Every rule of any of `categories`.
    pub fn of(categories: &[Category]) -> Vec<Rule> {
        Rule::ALL.iter().copied().filter(|rule| rule.categories().iter().any(|c| categories.contains(c))).collect()
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_category_has_bufs_rule_count() {
        // `buf config ls-breaking-rules --version v2` of buf 1.75, per category.
        let count = |category| Rule::of(&[category]).len();
        assert_eq!(Rule::ALL.len(), 64);
        assert_eq!((count(Category::File), count(Category::Package)), (51, 51));
        assert_eq!((count(Category::WireJson), count(Category::Wire)), (22, 15));
    }
}
